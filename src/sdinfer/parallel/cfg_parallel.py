"""CFG parallel: the two classifier-free guidance branches on two ranks (exact).

Classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", NeurIPS 2021
workshop, Eq. 6) evaluates the model on one batch of two halves, conditional and
unconditional (sdinfer's denoiser batches [cond, uncond], diffusers' pipelines [uncond, cond]).
Under CFG parallel (xDiT's ``cfg_parallel``, DistriFusion's ``split_batch``) rank r runs the
model on half r of every argument batched along dim 0 (sample, timesteps, text states, pooled
text, masks) and the two halves' outputs are all-gathered back into the full batch, so the
guidance combination and the sampler run unchanged, replicated on both ranks.  Inside, the step
context says which branch the rank's call holds (``branch``, no ``guidance_halves``), so the hooks
within see a call of one branch, as it is.

Communicated per model call: the model output, all-gathered once: each rank sends its half,
B x C x H x W elements for B prompts (a guided call of 2B rows) of C x H x W outputs, so
4 B C H W bytes in float32 (one call per step for one-evaluation-per-step samplers).

Exact: each half is what the batched call computes for it, up to the float rounding of a
smaller batch (max abs error <= 1e-5 in float32, tested).  Needs exactly two ranks and
guidance on (cfg != 1): a call of one branch has no halves to split, and is an error.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from diffusers.hooks import ModelHook

from ..cache.base import CacheHandle, hook_name
from ..context import StepContext, current_step, step_context
from ..errors import UserError
from .comm import Communicator


@dataclass
class CFGParallelConfig:
    """``cfg``: the guidance branches split over two ranks."""

    needs_guidance = True
    exact = True   # every rank computes what one device would: the caches may run under it

    def check_world_size(self, size: int) -> None:
        if size != 2:
            raise ValueError(f"cfg parallel runs the two guidance branches on two ranks: it needs a world "
                             f"size of 2, got {size}")


class SplitBatchHook(ModelHook):
    """On the denoiser: compute this rank's half of the batch, gather both halves' outputs."""

    def __init__(self, comm: Communicator):
        super().__init__()
        self.comm = comm

    def new_forward(self, module, *args, **kwargs):
        ctx = current_step()
        if ctx is not None and ctx.branch != "both":
            raise UserError(f"cfg parallel splits the guidance branches of a guided call, and this call "
                            f"holds one branch ({ctx.branch!r}): guidance is off (cfg 1); use a guidance "
                            "scale other than 1, or another strategy")
        batch = (args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))).shape[0]
        if batch % self.comm.size:
            raise UserError(f"cfg parallel splits the batch of each call between {self.comm.size} ranks, and "
                            f"this call's batch of {batch} does not divide: is guidance on (cfg != 1)?")
        half = _map_tensors(lambda x: x.chunk(self.comm.size)[self.comm.rank], (args, kwargs), batch)
        with step_context(self.rank_context(ctx)) if ctx is not None else contextlib.nullcontext():
            out = self.fn_ref.original_forward(*half[0], **half[1])
        return _map_tensors(lambda x: self.comm.all_gather(x, dim=0), out, batch // self.comm.size)


    def rank_context(self, ctx: StepContext) -> StepContext:
        """The step context of this rank's call: the one branch it holds where the batched call said
        which half holds which (the hooks inside see a call of one branch, as it is)."""
        halves = ctx.guidance_halves
        if halves is None or len(halves) != self.comm.size:
            return ctx
        return replace(ctx, branch=halves[self.comm.rank], guidance_halves=None)


def _map_tensors(fn, value, batch: int):
    """``value`` with ``fn`` applied to every tensor in it whose leading dimension is ``batch``."""
    if isinstance(value, torch.Tensor):
        return fn(value) if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return type(value)(**{k: _map_tensors(fn, v, batch) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(fn, v, batch) for v in value)
    return value


def apply_cfg_parallel(model: torch.nn.Module, config: CFGParallelConfig, handle: CacheHandle,
                       comm: Communicator) -> None:
    handle.register(model, SplitBatchHook(comm), hook_name("cfg_parallel"))
