"""FORA: Fast-Forward Caching in Diffusion Transformer Acceleration (Selvaraju et al., 2024).

In each transformer block the attention and MLP outputs change little between nearby
steps.  FORA computes them on every ``interval``-th step (and the last step) and keeps
them; on the steps between it skips both sub-layers and the block adds the cached outputs
to its residual stream through its *fresh* adaLN gates (the paper's Sec. 3: ``x + gate *
cache.attn``, ``x + gate * cache.mlp``; the gates depend on the current timestep and are
cheap).  Which children are the attention and MLP sub-layers is the model adapter's
declaration (``BlockGroup.sublayers``), so any declared transformer is supported.

Cached: each declared sub-layer's output (before the block's gate).  Refreshed: on full
steps only.  ``interval=1`` computes every step and is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.adapters import adapter_for, supported
from .base import CacheConfig, CacheHandle, ScheduleController, ScheduledHook, hook_name, whole_number


@dataclass
class FORAConfig(CacheConfig):
    interval: int = 3

    def __post_init__(self) -> None:
        self.interval = whole_number("fora", "interval", self.interval, 1)

    def is_full(self, ctx) -> bool:
        return ctx.step_index % self.interval == 0 or ctx.step_index == ctx.num_steps - 1  # 0: unknown


class ReuseOutputHook(ScheduledHook):
    """A sub-layer: computes and keeps its output on full steps, returns the kept one otherwise."""

    def __init__(self, controller: ScheduleController, key: str):
        super().__init__(controller)
        self.key = key

    def computed(self, state, output):
        state.keep(self.key, output)
        return output

    def reuse(self, state, args, kwargs):
        if self.key not in state.outputs:  # not run on the last full step: compute, keep nothing
            return self.fn_ref.original_forward(*args, **kwargs)
        return state.recall(self.key)


def hook_sublayers(model: torch.nn.Module, controller: ScheduleController, handle: CacheHandle,
                   method: str) -> None:
    """Put every declared attention / MLP sub-layer of ``model`` on ``controller``'s schedule."""
    adapter = adapter_for(model)
    sublayers = adapter.sublayers(model)
    if not sublayers:
        names = supported(lambda a: any(g.sublayers for g in a.groups))
        raise ValueError(f"{method} supports transformers whose adapter declares attention and MLP sub-layers "
                         f"({', '.join(names)}); {type(model).__name__} declares none"
                         + (": use deepcache" if adapter.family == "unet" else ""))
    handle.states.append(controller.states)
    name = hook_name(method)
    for key, module in sublayers:
        handle.register(module, ReuseOutputHook(controller, key), name)


def apply_fora(model: torch.nn.Module, config: FORAConfig, handle: CacheHandle) -> None:
    hook_sublayers(model, ScheduleController(config.is_full), handle, "fora")
