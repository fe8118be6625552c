"""TaylorSeer (Liu, Zou, Lyu, Chen & Zhang, "From Reusing to Forecasting: Accelerating
Diffusion Models with TaylorSeers", ICCV 2025).

Features change smoothly over the steps, so instead of reusing a feature frozen at the last
full step (FORA, DeepCache) TaylorSeer forecasts it with a Taylor series in the step index.
On every full step each cached feature F gets new Taylor factors by divided differences
with the previous full step, ``d^0 = F`` and ``d^(j+1) = (d^j - d^j_prev) / gap`` for
j < ``order``, where ``gap`` is the number of steps between the two full steps (the paper's
finite differences over N steps divided by N^j); on the steps between, the feature is
``F_hat = sum_j d^j k^j / j!``, k the number of steps since the last full step.  Distances are
step indices, as in the paper, not timesteps.

Full steps: the first ``warmup`` steps, then every ``interval``-th step from ``warmup`` on,
and the last step when the step count is known.  Cached features:
- transformers: every declared attention / MLP sub-layer (``BlockGroup.sublayers``), whose
  forecast goes through the block's fresh adaLN gates, as FORA (which is this with order 0);
- UNets: the deep feature DeepCache keeps (the output of the up block above skip branch 0);
  between full steps the deep path does not run and its forecast stands in for it, while
  the shallow down / up blocks run on the fresh input.
``interval=1`` computes every step and is exact.  Memory: ``order + 1`` tensors per feature.
Defaults: interval 3, order 1 (as diffusers recommends), warmup 2; their speed-up and PSNR
beside FORA's and DeepCache's at the same interval: BENCHMARKS.md, feature caches on the default
models.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..models.adapters import adapter_for
from .base import CacheConfig, CacheHandle, ScheduleController, StepState, whole_number
from .deepcache import hook_deep_path
from .fora import hook_sublayers

ORDERS = (0, 1, 2)


class TaylorSeries:
    """The Taylor factors of one feature (a tensor, or a tuple of tensors and Nones), updated
    on the steps it is computed and evaluated on the others."""

    def __init__(self, order: int):
        self.order = order
        self.step: int | None = None      # of the last update
        self.factors: list[list[torch.Tensor] | None] = []   # per tensor of the feature
        self.is_tuple = False

    def update(self, feature, step: int) -> None:
        parts = feature if isinstance(feature, tuple) else (feature,)
        gap = step - self.step if self.step is not None else 0
        previous = self.factors if gap > 0 and len(self.factors) == len(parts) else [None] * len(parts)
        self.factors = [None if part is None else self._differences(part, old or [], gap)
                        for part, old in zip(parts, previous)]
        self.is_tuple, self.step = isinstance(feature, tuple), step

    def _differences(self, feature: torch.Tensor, previous: list[torch.Tensor], gap: int) -> list[torch.Tensor]:
        factors = [feature]
        for old in previous[:self.order]:
            factors.append((factors[-1] - old) / gap)
        return factors

    def forecast(self, step: int):
        k = step - self.step
        parts = [None if factors is None else self._evaluate(factors, k) for factors in self.factors]
        return tuple(parts) if self.is_tuple else parts[0]

    @staticmethod
    def _evaluate(factors: list[torch.Tensor], k: int) -> torch.Tensor:
        value = factors[0]
        for j in range(1, len(factors)):
            value = value + factors[j] * (k ** j / math.factorial(j))
        return value


class TaylorState(StepState):
    """A fixed-schedule state whose kept outputs are Taylor series, recalled as forecasts."""

    def __init__(self, order: int):
        self.order = order
        super().__init__()

    def keep(self, key: str, output) -> None:
        self.outputs.setdefault(key, TaylorSeries(self.order)).update(output, self.step)

    def recall(self, key: str):
        return self.outputs[key].forecast(self.step)


@dataclass
class TaylorSeerConfig(CacheConfig):
    interval: int = 3
    order: int = 1
    warmup: int = 2

    def __post_init__(self) -> None:
        self.interval = whole_number("taylorseer", "interval", self.interval, 1)
        if self.order not in ORDERS:
            raise ValueError(f"taylorseer order must be one of {', '.join(map(str, ORDERS))}, got {self.order}")
        self.warmup = whole_number("taylorseer", "warmup", self.warmup, 0)
        self.order = int(self.order)

    def is_full(self, ctx) -> bool:
        step = ctx.step_index
        return (step < self.warmup or (step - self.warmup) % self.interval == 0
                or step == ctx.num_steps - 1)   # num_steps 0: unknown


def apply_taylorseer(model: torch.nn.Module, config: TaylorSeerConfig, handle: CacheHandle) -> None:
    controller = ScheduleController(config.is_full, functools.partial(TaylorState, config.order))
    if adapter_for(model).family == "unet":
        hook_deep_path(model, 0, controller, handle, "taylorseer")
    else:
        hook_sublayers(model, controller, handle, "taylorseer")
