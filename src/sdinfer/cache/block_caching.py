"""Block Caching (Wimbauer et al., "Cache Me if You Can: Accelerating Diffusion Models through
Block Caching", CVPR 2024).

A layer block's output changes little between most consecutive steps, by an amount that depends
on the block and the step.  Calibration (``sdinfer calibrate --method blockcache``) runs the
uncached model on calibration prompts and records, for each layer block i and step t, the
relative change L1_rel(i, t) = ||o_{i,t} - o_{i,t-1}||_1 / ||o_{i,t}||_1 (the paper's change
metric, per sample, averaged over the runs), and the mean and standard deviation of each of the
block's output channels at each step (kept at every fifth of the run: they change smoothly).

Schedule (the paper's automatic cache schedule): step 0 computes every block; after it a block is
recomputed on the step where the change accumulated since its last refresh reaches ``threshold``,
and otherwise its cached output stands in.  The schedule depends on the calibration alone, not on
the run's data.  For a step count other than the calibrated one the profile is read in the run's
progress (step / (steps - 1)): a step's change is the calibrated change accumulated over the same
stretch of the run (a bare model whose step count is unknown is read at the calibrated count).

Scale-shift alignment (``align=true``): a cached output o_s, computed at step s and reused at step
t, is mapped channel by channel, o = (o_s - mu_s) * sigma_t / sigma_s + mu_t, with the channel's
calibrated mean mu and deviation sigma at both steps.  The paper trains a per-step scale and shift
per channel against the uncached model for one fixed schedule; this is a closed-form variant from
the calibration runs: the affine map that carries the channel's statistics at the cached step onto
those at the current one (the least-squares fit of o_t on o_s where the two are perfectly
correlated), which needs no training and holds for any threshold and step count.

Layer blocks (the adapter's ``layer_blocks``): on UNets each resnet and each attention
(transformer) block of the down, mid and up blocks, the paper's granularity, so a cached down
block's skips are its cached layer outputs; on transformers the attention and MLP sub-layers of
each block, which the block adds to its residual stream through fresh gates (caching a whole
transformer block would also freeze the residual stream it carries).

Cached: each layer block's output.  Refreshed: per block, on the steps where its accumulated change
reaches ``threshold``.  ``threshold=0`` computes every block on every step and is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..context import StepContext, current_step
from ..models.adapters import adapter_for, supported
from .base import (BranchStates, CacheConfig, CacheHandle, LayerPlanState, PlannedLayerHook, hook_name,
                   map_tensors, tensors_of)
from .calibration import Calibration, CalibrationRun, load_for, register_calibrator

METHOD = "blockcache"
STAT_KNOTS = 6   # channel statistics are kept at every fifth of the run (they change smoothly)


@dataclass
class BlockCachingConfig(CacheConfig):
    threshold: float = 0.05
    align: bool = True
    calibration: str = ""   # a calibration file; empty: the one beside the model's weights

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"blockcache threshold must be a number >= 0, got {self.threshold!r}")
        if not isinstance(self.align, bool):
            raise ValueError(f"blockcache align must be true or false, got {self.align!r}")
        self.threshold = float(self.threshold)


def layer_blocks(model: torch.nn.Module, method: str) -> list[tuple[str, torch.nn.Module]]:
    """The model's layer blocks, or a clear error naming the classes that declare some."""
    blocks = adapter_for(model).layer_blocks(model)
    if not blocks:
        names = supported(lambda a: any(g.layers or g.sublayers for g in a.groups))
        raise ValueError(f"{method} supports models whose adapter declares layer blocks ({', '.join(names)}); "
                         f"{type(model).__name__} declares none")
    return blocks


def check_units(calibration: Calibration, units: list[str], model: torch.nn.Module, method: str) -> None:
    if calibration.meta.get("units") != units:
        raise ValueError(f"this {method} calibration was made for a model with other layer blocks than this "
                         f"{type(model).__name__}; remake it with `sdinfer calibrate --method {method}`")


def progress(step: int, num_steps: int) -> float:
    return step / (num_steps - 1) if num_steps > 1 else 0.0


def channel_dim(t: torch.Tensor) -> int:
    """Feature maps (B, C, H, W, ...) hold channels in dim 1, token sequences (B, N, C) last."""
    return 1 if t.ndim >= 4 else -1


def at(table: torch.Tensor, p: float) -> torch.Tensor:
    """Row ``p`` in [0, 1] of a table of rows at evenly spaced progress, linearly interpolated."""
    position = min(max(p, 0.0), 1.0) * (table.shape[0] - 1)
    low = int(position)
    high = min(low + 1, table.shape[0] - 1)
    return torch.lerp(table[low], table[high], position - low)


def refresh_plan(cumulative: np.ndarray, threshold: float, num_steps: int) -> np.ndarray:
    """(steps, blocks) booleans: which block computes on which step of a run of ``num_steps``.

    ``cumulative``: (blocks, calibrated steps), each block's change accumulated from step 0."""
    calibrated = np.linspace(0.0, 1.0, cumulative.shape[1])
    run = np.linspace(0.0, 1.0, num_steps)
    change = np.diff(np.stack([np.interp(run, calibrated, row) for row in cumulative], axis=1), axis=0)
    plan = np.ones((num_steps, cumulative.shape[0]), dtype=bool)
    accumulated = np.zeros(cumulative.shape[0])
    for step in range(1, num_steps):
        accumulated += change[step - 1]
        plan[step] = accumulated >= threshold
        accumulated[plan[step]] = 0.0
    return plan


class BlockCachingPlan:
    """The calibration read for one threshold: each block's steps, and the alignment of its reuses."""

    def __init__(self, calibration: Calibration, units: list[str], threshold: float):
        change = calibration.tensors["change"].double().numpy()
        self.calibration, self.units = calibration, units
        self.steps = int(calibration.meta["steps"])
        self.cumulative = np.concatenate([np.zeros((len(units), 1)), np.cumsum(change, axis=1)], axis=1)
        self.threshold = threshold
        self.plans: dict[int, np.ndarray] = {}

    def run_steps(self, ctx: StepContext) -> int:
        return ctx.num_steps or self.steps   # 0: a bare model's unknown step count

    def computes(self, ctx: StepContext, index: int) -> bool:
        num_steps = self.run_steps(ctx)
        if ctx.step_index >= num_steps:
            return True
        if num_steps not in self.plans:
            self.plans[num_steps] = refresh_plan(self.cumulative, self.threshold, num_steps)
        return bool(self.plans[num_steps][ctx.step_index, index])

    def aligner(self, index: int):
        unit, tensors = self.units[index], self.calibration.tensors
        stats = [(tensors[f"mean.{unit}.{i}"].float(), tensors[f"std.{unit}.{i}"].float())
                 for i in range(int(self.calibration.meta["outputs"][index]))]

        def align(kept, computed_at: int, ctx: StepContext):
            num_steps = self.run_steps(ctx)
            cached, now = progress(computed_at, num_steps), progress(ctx.step_index, num_steps)
            return map_tensors(lambda i, t: self._affine(t, *stats[i], cached, now), kept)
        return align

    @staticmethod
    def _affine(t: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, cached: float, now: float) -> torch.Tensor:
        std_cached = at(std, cached)
        scale = torch.where(std_cached > 0, at(std, now) / std_cached.clamp(min=1e-12), torch.ones_like(std_cached))
        shift = at(mean, now) - scale * at(mean, cached)
        shape = [1] * t.ndim
        shape[channel_dim(t)] = -1
        return t * scale.view(shape).to(t) + shift.view(shape).to(t)


def apply_block_caching(model: torch.nn.Module, config: BlockCachingConfig, handle: CacheHandle) -> None:
    blocks = layer_blocks(model, METHOD)
    units = [name for name, _ in blocks]
    calibration = load_for(model, METHOD, config.calibration)
    check_units(calibration, units, model, METHOD)
    plan = BlockCachingPlan(calibration, units, config.threshold)
    states = BranchStates(LayerPlanState)
    handle.states.append(states)
    name = hook_name(METHOD)
    for index, (_, module) in enumerate(blocks):
        adjust = plan.aligner(index) if config.align else None
        handle.register(module, PlannedLayerHook(states, plan.computes, index, adjust), name)


# ---- calibration ---------------------------------------------------------------------------
class ProfileRecorder:
    """Forward hooks on the layer blocks that accumulate, over the calibration runs, each block's
    relative change per step and its output channels' first two moments per step."""

    def __init__(self, blocks: list[tuple[str, torch.nn.Module]], steps: int):
        self.steps = steps
        self.change = torch.zeros(len(blocks), steps, dtype=torch.float64)
        self.samples = torch.zeros(len(blocks), steps, dtype=torch.float64)
        self.moments: list[list[list[torch.Tensor]]] = [[] for _ in blocks]   # block, output: [n, sum, sum sq]
        self.previous: dict[int, tuple[int, int, list[torch.Tensor]]] = {}
        self.handles = [module.register_forward_hook(self._hook(index)) for index, (_, module) in enumerate(blocks)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, index: int):
        def record(module, args, output):
            ctx = current_step()
            outputs = [t.detach().float() for t in tensors_of(output)]
            self._moments(index, ctx.step_index, outputs)
            last = self.previous.get(index)
            if last is not None and last[0] == ctx.generation and last[1] == ctx.step_index - 1:
                self._change(index, ctx.step_index, last[2], outputs)
            self.previous[index] = (ctx.generation, ctx.step_index, outputs)
        return record

    def _change(self, index: int, step: int, before: list[torch.Tensor], now: list[torch.Tensor]) -> None:
        diff = sum((a - b).abs().flatten(1).sum(1) for a, b in zip(now, before))
        norm = sum(a.abs().flatten(1).sum(1) for a in now)
        self.change[index, step] += float((diff / norm.clamp(min=1e-12)).sum())
        self.samples[index, step] += diff.shape[0]

    def _moments(self, index: int, step: int, outputs: list[torch.Tensor]) -> None:
        moments = self.moments[index]
        for i, t in enumerate(outputs):
            channels = channel_dim(t) % t.ndim
            others = [d for d in range(t.ndim) if d != channels]
            if i == len(moments):
                moments.append([torch.zeros(self.steps, 1, dtype=torch.float64)] +
                               [torch.zeros(self.steps, t.shape[channels], dtype=torch.float64) for _ in range(2)])
            moments[i][0][step] += t.numel() // t.shape[channels]
            moments[i][1][step] += t.sum(others).cpu().double()   # the moments live on the CPU
            moments[i][2][step] += t.square().sum(others).cpu().double()

    def tensors(self, units: list[str]) -> dict[str, torch.Tensor]:
        if (self.samples[:, 1:] == 0).any():
            raise ValueError("blockcache calibration saw a layer block skip a step; calibrate the uncached model")
        out = {"change": (self.change[:, 1:] / self.samples[:, 1:]).float()}
        for unit, moments in zip(units, self.moments):
            for i, (n, total, squares) in enumerate(moments):
                mean = total / n
                std = (squares / n - mean.square()).clamp(min=0).sqrt()
                out[f"mean.{unit}.{i}"], out[f"std.{unit}.{i}"] = _knots(mean), _knots(std)
        return out


def _knots(per_step: torch.Tensor) -> torch.Tensor:
    knots = torch.linspace(0.0, 1.0, min(STAT_KNOTS, per_step.shape[0])).tolist()
    return torch.stack([at(per_step, p) for p in knots]).half()


def calibrate_block_caching(run: CalibrationRun) -> Calibration:
    net = run.pipe.model.denoiser
    blocks = layer_blocks(net, METHOD)
    recorder = ProfileRecorder(blocks, run.steps)
    try:
        run.generate()
    finally:
        recorder.remove()
    units = [name for name, _ in blocks]
    meta = {"units": units, "outputs": [len(m) for m in recorder.moments], "steps": run.steps,
            "sampler": run.sampler, "guidance_scale": run.guidance_scale, "prompts": len(run.prompts)}
    return Calibration(METHOD, recorder.tensors(units), meta)


register_calibrator(METHOD, calibrate_block_caching)
