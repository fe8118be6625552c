"""DeepCache (Ma, Fang & Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024).

A UNet's deep features change slowly over the steps, its shallow ones carry the detail.  On
a *full* step every block runs and DeepCache keeps the output of the up block just above the
chosen skip branch; on the other steps only the shallow path runs (down blocks
``0..branch``, then up blocks from ``n - 1 - branch`` on), and the deep path (the deeper
down blocks, the mid block and the deeper up blocks) is replaced by that cached output
(the paper's Eq. 5-6: the skip branch of level ``branch`` carries fresh shallow features,
the main branch the cached high-level ones).

``layer`` refines the branch as DeepCache's ``cache_branch_id`` does (block * L + layer, L the
layers of an up block): at layer l only the down block's layers below l and the mirrored up
block's last L - l layers run; the default (-1) runs both whole blocks.

Cached: the output of up block ``n - 2 - branch`` (with ``layer``: of the last skipped layer of
up block ``n - 1 - branch``).  Refreshed: on full steps only.
Schedules: ``uniform`` (a full step every ``interval`` steps) or ``nonuniform`` (the
paper's 1:N non-uniform schedule: as many full steps, placed more densely around
``center`` (a fraction of the run) with exponent ``power``; uniform where the step count
is unknown, as for a bare model called outside any pipeline).  ``interval=1`` computes every
step and is exact.  Skipped down blocks hand placeholders to the skip list (the skipped up
blocks are the only ones that would read them), so no deep block runs at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..models.adapters import adapter_for, supported
from .base import (CacheConfig, CacheHandle, ScheduleController, ScheduledHook, hidden_states_of, hook_name,
                   whole_number)

SCHEDULES = ("uniform", "nonuniform")


@dataclass
class DeepCacheConfig(CacheConfig):
    interval: int = 3
    branch: int = 0
    layer: int = -1
    schedule: str = "uniform"
    center: float = 0.5
    power: float = 1.4

    def __post_init__(self) -> None:
        self.interval = whole_number("deepcache", "interval", self.interval, 1)
        self.branch = whole_number("deepcache", "branch", self.branch, 0)
        if self.layer != -1:
            self.layer = whole_number("deepcache", "layer", self.layer, 0, ", or -1 for the branch's whole block")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"deepcache schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if not 0.0 <= self.center <= 1.0:
            raise ValueError(f"deepcache center must lie in [0, 1], got {self.center}")
        if self.power < 1.0:
            raise ValueError(f"deepcache power must be >= 1, got {self.power}")
        self.layer = int(self.layer)

    def is_full(self, ctx) -> bool:
        if self.schedule == "uniform" or ctx.num_steps == 0:   # 0: step count unknown
            return ctx.step_index % self.interval == 0
        return ctx.step_index in self.full_steps(ctx.num_steps)

    def full_steps(self, num_steps: int) -> set[int]:
        """Indices of the fully computed steps of a run of ``num_steps``."""
        if self.schedule == "uniform" or self.interval == 1:
            return set(range(0, num_steps, self.interval))
        count = math.ceil(num_steps / self.interval)
        c = self.center * (num_steps - 1)
        steps = {0}
        for k in range(count):
            u = -1.0 + 2.0 * k / max(count - 1, 1)
            reach = (num_steps - 1 - c) if u > 0 else c
            steps.add(int(round(c + math.copysign(abs(u) ** self.power, u) * reach)))
        return steps


class SkipDownHook(ScheduledHook):
    """A deep down block: runs on full steps, hands placeholders to the skip list otherwise."""

    def __init__(self, controller: ScheduleController, n_skips: int):
        super().__init__(controller)
        self.n_skips = n_skips

    def reuse(self, state, args, kwargs):
        hidden = hidden_states_of(args, kwargs)
        return hidden, (hidden,) * self.n_skips


class SkipMidHook(ScheduledHook):
    def reuse(self, state, args, kwargs):
        return hidden_states_of(args, kwargs)


class SkipUpHook(ScheduledHook):
    """A deep up block; the last one's output is the cached deep feature."""

    def __init__(self, controller: ScheduleController, last: bool):
        super().__init__(controller)
        self.last = last

    def computed(self, state, output):
        if self.last:
            state.keep("deep", output)
        return output

    def reuse(self, state, args, kwargs):
        return state.recall("deep")


def _tensor(output):
    return output[0] if isinstance(output, tuple) else getattr(output, "sample", output)


class SkipLayerHook(ScheduledHook):
    """A layer (ResNet, attention, resampler) inside the branch's own down or up block that
    lies below the branch: a down-path layer hands its input on as a placeholder, an up-path
    layer stands in for the cached deep feature, which the last of them keeps on full steps."""

    def __init__(self, controller: ScheduleController, up: bool, keeps: bool, returns_tuple: bool):
        super().__init__(controller)
        self.up, self.keeps, self.returns_tuple = up, keeps, returns_tuple

    def computed(self, state, output):
        if self.keeps:
            state.keep("deep", _tensor(output))
        return output

    def reuse(self, state, args, kwargs):
        value = state.recall("deep") if self.up else hidden_states_of(args, kwargs)
        if not self.returns_tuple:
            return value
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=value)
        return (value,)


def _layers(block: torch.nn.Module) -> list[list[tuple[torch.nn.Module, bool]]]:
    """A UNet block's layers in forward order: each ResNet with the attention after it, as
    (module, whether it is an attention: those return a tuple or an output object)."""
    attentions = list(getattr(block, "attentions", None) or [])
    return [[(resnet, False), *((a, True) for a in attentions[i:i + 1])] for i, resnet in enumerate(block.resnets)]


def _skip_count(block: torch.nn.Module) -> int:
    """How many tensors a down block adds to the UNet's skip list."""
    return len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)


def hook_deep_path(model: torch.nn.Module, branch: int, controller: ScheduleController, handle: CacheHandle,
                   method: str, layer: int = -1) -> None:
    """Put the UNet's path below skip branch (``branch``, ``layer``) on ``controller``'s schedule.

    DeepCache's branch id is block * L + layer, L the layers of an up block: at layer l the
    down block ``branch`` keeps its layers below l and the mirrored up block its last L - l;
    ``layer=-1`` (= L - 1) keeps the whole blocks, whose deep feature is the output of the up
    block below."""
    adapter = adapter_for(model)
    down, up = adapter.blocks_in(model, "down"), adapter.blocks_in(model, "up")
    mid = next(iter(adapter.blocks_in(model, "mid")), None)
    if branch > len(down) - 2:
        raise ValueError(f"{method} branch {branch} leaves no deep block to cache in a UNet with "
                         f"{len(down)} down blocks; choose branch 0..{len(down) - 2}")
    handle.states.append(controller.states)
    name = hook_name(method)
    for block in down[branch + 1:]:
        handle.register(block, SkipDownHook(controller, _skip_count(block)), name)
    if mid is not None:
        handle.register(mid, SkipMidHook(controller), name)
    mirror = up[len(up) - 1 - branch]
    up_layers = _layers(mirror)
    if not -1 <= layer < len(up_layers):
        raise ValueError(f"{method} layer {layer} is not a layer of branch {branch}'s blocks, which have "
                         f"{len(up_layers)} up layers; choose layer 0..{len(up_layers) - 1} or -1 (the whole block)")
    layer = len(up_layers) - 1 if layer == -1 else layer
    skipped_up = [m for modules in up_layers[:len(up_layers) - 1 - layer] for m in modules]
    skipped_down = [m for modules in _layers(down[branch])[layer:] for m in modules]
    skipped_down += [(m, False) for m in getattr(down[branch], "downsamplers", None) or []]
    for module, is_attention in skipped_down:
        handle.register(module, SkipLayerHook(controller, False, False, is_attention), name)
    for i, (module, is_attention) in enumerate(skipped_up):
        handle.register(module, SkipLayerHook(controller, True, i == len(skipped_up) - 1, is_attention), name)
    n_deep_up = len(up) - 1 - branch
    for j, block in enumerate(up[:n_deep_up]):
        handle.register(block, SkipUpHook(controller, not skipped_up and j == n_deep_up - 1), name)


def apply_deepcache(model: torch.nn.Module, config: DeepCacheConfig, handle: CacheHandle) -> None:
    if adapter_for(model).family != "unet":
        raise ValueError(f"deepcache supports UNets ({', '.join(supported(lambda a: a.family == 'unet'))}); "
                         f"{type(model).__name__} is a transformer: use fora")
    hook_deep_path(model, config.branch, ScheduleController(config.is_full), handle, "deepcache", config.layer)
