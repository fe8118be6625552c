"""T-GATE: temporally gating the attention (Zhang, Liu et al., "Cross-Attention Makes Inference
Cumbersome in Text-to-Image Diffusion Models", arXiv 2404.02747, 2024 (v1); Liu, Zhang et al.,
"Faster Diffusion via Temporal Attention Decomposition", TMLR 2025 (v2)).

Cross-attention output converges within the first steps (the *semantics-planning* phase) and
matters little afterwards (the *fidelity-improving* phase), while self-attention matters
little early on and much later.  With m = ``gate_step`` (``round(gate * num_steps)`` when
``gate_step`` is 0):

- steps 0..m-2 (planning): cross-attention is computed; v2: self-attention is computed on
  steps 0..``warm_up`` and on every ``sp_interval``-th step, and reused in between;
- step m-1 (the gate): everything is computed, and each cross-attention module keeps its
  output averaged over the guidance halves, C = (C_uncond + C_cond) / 2 (the paper's cached
  cross-attention; v2 keeps self-attention the same way);
- steps m.. (fidelity): cross-attention is never computed again, its kept output stands in;
  v2: self-attention is computed on every ``fi_interval``-th step and reused in between.
  With ``merge`` (the paper's pipelines) the guidance branches are merged: both branches now
  read the same kept cross-attention, so a batched guidance call runs its conditional half
  only and returns that output for both halves (any guidance combination gives it back),
  which halves the work of every remaining step.

Cached: cross-attention outputs (from the gate on) and self-attention outputs (v2, between
its computed steps).  ``gate=1`` (or ``gate_step`` >= the step count) with ``sp_interval=1``
computes everything on every step and is exact.

Coverage: attention modules are found by type in the adapter's blocks (diffusers
``Attention`` with ``is_cross_attention`` is cross, any other is self), so UNets and PixArt
(``attn2`` is cross, ``attn1`` self; ``only_cross_attention`` blocks have two cross ones) and
any newly declared class need no code.  MM-DiTs (SD3, FLUX) have no cross-attention: text and
image tokens share one joint attention.  Their analogue here: from the gate on the *text
stream* is frozen: the sub-modules the adapter declares as acting on the text tokens alone
(``BlockGroup.text_stream``: the joint attention's text projections ``add_q/k/v_proj`` and
``to_add_out``, and the text MLP ``ff_context``) return their outputs kept at the gate, so the
image tokens keep attending to the gate's text keys and values while the text-token layers
are skipped; the joint attention itself counts as self-attention (v2) and the branches merge
as above.  A hook cannot drop the text query rows from inside the joint attention, and FLUX's
single-stream blocks, which carry text and image tokens in one sequence, keep computing them.

Where this differs from the reference (``HaozheLiu-ST/T-GATE``, ``tgate/*.py``):
- the merged pass takes the *conditional* half's inputs; the reference feeds the negative
  prompt's.  Where the text enters only through cross-attention (SD 1.x/2.x, PixArt) the two
  are the same; they differ where it also enters the timestep embedding (the default UNet's
  text time embedding, SD3's pooled projection, SDXL), on the default models by a fraction of a
  dB of PSNR.
- the merge is a hook on the model, not a rewritten pipeline: the pipeline still passes both
  halves.  It needs the halves' order from the step context (``guidance_halves``); stock
  pipelines that do not say they batch guidance (PixArt's) run both halves, as does
  ``merge=false``, where each branch keeps its own cross-attention output (no average).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from diffusers.hooks import ModelHook

from ..context import StepContext, step_context
from ..models.adapters import adapter_for, supported
from .base import (BranchStates, CacheConfig, CacheHandle, hidden_states_of, hook_name, map_tensors,
                   require_step, whole_number)

MERGED = "merged"   # the branch of a guidance batch cut to one half


@dataclass
class TGateConfig(CacheConfig):
    # fraction of the steps in the planning phase; the paper gates at 10 of 25 (0.4), which on the
    # default DiT at 50 steps lost prompt adherence; 0.5 kept it (BENCHMARKS.md, T-GATE)
    gate: float = 0.5
    gate_step: int = 0       # the planning phase's step count; 0 takes it from ``gate``
    sp_interval: int = 5     # v2: self-attention computed every sp_interval steps while planning
    fi_interval: int = 1     # v2: and every fi_interval steps after the gate
    warm_up: int = 2         # v2: steps 0..warm_up always compute self-attention
    merge: bool = True       # merge the guidance branches after the gate
    exact_parallel = False   # it drops the unconditional half of the batch mid-run, which CFG parallel splits

    def __post_init__(self) -> None:
        if not 0.0 < self.gate <= 1.0:
            raise ValueError(f"tgate gate must lie in (0, 1] (a fraction of the steps), got {self.gate}")
        for knob, minimum in (("gate_step", 0), ("sp_interval", 1), ("fi_interval", 1), ("warm_up", 0)):
            setattr(self, knob, whole_number("tgate", knob, getattr(self, knob), minimum))
        if not isinstance(self.merge, bool):
            raise ValueError(f"tgate merge must be true or false, got {self.merge!r}")

    def planning_steps(self, ctx: StepContext) -> int:
        """m: steps 0..m-1 compute cross-attention, step m-1 keeps it."""
        if self.gate_step:
            return self.gate_step
        if ctx.num_steps == 0:
            raise ValueError(f"tgate gate={self.gate} needs the run's step count, which this call does not "
                             "tell (a model called outside any pipeline): give gate_step instead")
        return max(1, round(self.gate * ctx.num_steps))

    def phase(self, ctx: StepContext) -> str:
        m = self.planning_steps(ctx)
        return "planning" if ctx.step_index < m - 1 else "gate" if ctx.step_index == m - 1 else "fidelity"

    def computes_cross(self, ctx: StepContext) -> bool:
        return self.phase(ctx) != "fidelity"

    def keeps_cross(self, ctx: StepContext) -> bool:
        return self.phase(ctx) == "gate"

    def computes_self(self, ctx: StepContext) -> bool:
        phase, s = self.phase(ctx), ctx.step_index
        if phase == "planning":
            return s <= self.warm_up or s % self.sp_interval == 0
        return phase == "gate" or s % self.fi_interval == 0


class TGateController:
    """The shared state of one applied T-GATE: per branch, the kept output of each module."""

    def __init__(self, config: TGateConfig):
        self.config = config
        self.states: BranchStates[dict] = BranchStates(dict)

    def merges(self, ctx: StepContext) -> bool:
        """Whether this call is a guidance batch whose branches merge from the gate on."""
        halves = ctx.guidance_halves
        return self.config.merge and ctx.branch == "both" and halves is not None and "cond" in halves


def _mean_of_halves(_, t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2)
    return (first + second) / 2


class GatedHook(ModelHook):
    """An attention module (or text-stream sub-module) on one of T-GATE's schedules: computes
    when ``computes`` says (or when nothing is kept), keeps its output when ``keeps`` says."""

    def __init__(self, controller: TGateController, key: str, computes: Callable[[StepContext], bool],
                 keeps: Callable[[StepContext], bool]):
        super().__init__()
        self.controller, self.key, self.computes, self.keeps = controller, key, computes, keeps

    def new_forward(self, module, *args, **kwargs):
        ctx = require_step()
        kept = self.controller.states.get(ctx)
        if self.key in kept and not self.computes(ctx):
            return kept[self.key]
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.keeps(ctx):
            self._keep(ctx, kept, output)
        return output

    def _keep(self, ctx: StepContext, kept: dict, output) -> None:
        if self.controller.config.phase(ctx) == "gate" and self.controller.merges(ctx):
            merged = self.controller.states.get(replace(ctx, branch=MERGED, guidance_halves=None))
            merged[self.key] = map_tensors(_mean_of_halves, output)
        else:
            kept[self.key] = output


class MergeBranchesHook(ModelHook):
    """On the model: from the gate on, a guidance batch runs its conditional half only (the
    inputs whose first dimension is the batch are cut) and both halves get its output."""

    def __init__(self, controller: TGateController):
        super().__init__()
        self.controller = controller

    def new_forward(self, module, *args, **kwargs):
        ctx = require_step()
        if not self.controller.merges(ctx) or self.controller.config.phase(ctx) != "fidelity":
            return self.fn_ref.original_forward(*args, **kwargs)
        batch = hidden_states_of(args, kwargs).shape[0]
        half = batch // 2
        start = ctx.guidance_halves.index("cond") * half

        def cond_half(_, t: torch.Tensor) -> torch.Tensor:
            return t[start:start + half] if t.ndim and t.shape[0] == batch else t

        args, kwargs = map_tensors(cond_half, args), map_tensors(cond_half, kwargs)
        with step_context(replace(ctx, branch=MERGED, guidance_halves=None)):
            output = self.fn_ref.original_forward(*args, **kwargs)
        return map_tensors(lambda _, t: torch.cat([t, t]), output)


def apply_tgate(model: torch.nn.Module, config: TGateConfig, handle: CacheHandle) -> None:
    adapter = adapter_for(model)
    attentions = adapter.attentions(model)
    text_side = [(key, m) for key, m, cross in attentions if cross] + adapter.text_stream(model)
    if adapter.conditioning != "text" or not text_side:
        names = supported(lambda a: a.conditioning == "text")
        raise ValueError(f"tgate gates the text's cross-attention; it supports text-conditioned models with "
                         f"cross-attention or an MM-DiT text stream ({', '.join(names)}); "
                         f"{type(model).__name__} has neither")
    controller = TGateController(config)
    handle.states.append(controller.states)
    name = hook_name("tgate")
    for key, module in text_side:
        handle.register(module, GatedHook(controller, key, config.computes_cross, config.keeps_cross), name)
    if config.sp_interval > 1 or config.fi_interval > 1:
        for key, module, cross in attentions:
            if not cross:
                handle.register(module, GatedHook(controller, key, config.computes_self, config.computes_self), name)
    handle.register(model, MergeBranchesHook(controller), name)
