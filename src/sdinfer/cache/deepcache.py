"""DeepCache (Ma, Fang & Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024).

A UNet's deep features change slowly over the steps, its shallow ones carry the detail.  On
a *full* step every block runs and DeepCache keeps the output of the up block just above the
chosen skip branch; on the other steps only the shallow path runs (down blocks
``0..branch``, then up blocks from ``n - 1 - branch`` on), and the deep path (the deeper
down blocks, the mid block and the deeper up blocks) is replaced by that cached output
(the paper's Eq. 5-6: the skip branch of level ``branch`` carries fresh shallow features,
the main branch the cached high-level ones).

Cached: the output of up block ``n - 2 - branch``.  Refreshed: on full steps only.
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
from .base import CacheHandle, ScheduleController, ScheduledHook, hidden_states_of, hook_name

SCHEDULES = ("uniform", "nonuniform")


@dataclass
class DeepCacheConfig:
    interval: int = 3
    branch: int = 0
    schedule: str = "uniform"
    center: float = 0.5
    power: float = 1.4

    def __post_init__(self) -> None:
        if int(self.interval) != self.interval or self.interval < 1:
            raise ValueError(f"deepcache interval must be a whole number >= 1, got {self.interval}")
        if int(self.branch) != self.branch or self.branch < 0:
            raise ValueError(f"deepcache branch must be a whole number >= 0, got {self.branch}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"deepcache schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if not 0.0 <= self.center <= 1.0:
            raise ValueError(f"deepcache center must lie in [0, 1], got {self.center}")
        if self.power < 1.0:
            raise ValueError(f"deepcache power must be >= 1, got {self.power}")
        self.interval, self.branch = int(self.interval), int(self.branch)

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
            state.outputs["deep"] = output
        return output

    def reuse(self, state, args, kwargs):
        return state.outputs["deep"]


def _skip_count(block: torch.nn.Module) -> int:
    """How many tensors a down block adds to the UNet's skip list."""
    return len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)


def apply_deepcache(model: torch.nn.Module, config: DeepCacheConfig, handle: CacheHandle) -> None:
    adapter = adapter_for(model)
    if adapter.family != "unet":
        raise ValueError(f"deepcache supports UNets ({', '.join(supported(lambda a: a.family == 'unet'))}); "
                         f"{type(model).__name__} is a transformer: use fora")
    down = [m for n, m in adapter.blocks(model) if n.startswith("down_blocks")]
    up = [m for n, m in adapter.blocks(model) if n.startswith("up_blocks")]
    mid = getattr(model, "mid_block", None)
    if config.branch > len(down) - 2:
        raise ValueError(f"deepcache branch {config.branch} leaves no deep block to cache in a UNet with "
                         f"{len(down)} down blocks; choose branch 0..{len(down) - 2}")
    controller = ScheduleController(config.is_full)
    handle.states.append(controller.states)
    name = hook_name("deepcache")
    for block in down[config.branch + 1:]:
        handle.register(block, SkipDownHook(controller, _skip_count(block)), name)
    if mid is not None:
        handle.register(mid, SkipMidHook(controller), name)
    n_deep_up = len(up) - 1 - config.branch
    for j, block in enumerate(up[:n_deep_up]):
        handle.register(block, SkipUpHook(controller, j == n_deep_up - 1), name)
