"""The sampler interface, the timestep grid and the sampling loop.

A sampler is a step function ``step(denoiser, x, t, t_next, state, ...) -> x_next``
over continuous times of a ``NoiseSchedule``; its multistep history lives in
``state``, a dict the loop creates per generation.  The loop hands every model
evaluation a ``StepContext`` that accelerators read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..context import StepContext
from ..denoiser import Denoiser

DISCRETE_SPACINGS = ("trailing", "leading", "linspace")
CONTINUOUS_SPACINGS = ("karras", "logsnr", "time_uniform", "time_quadratic", "flow")
SPACINGS = DISCRETE_SPACINGS + CONTINUOUS_SPACINGS
KARRAS_RHO = 7.0


class Sampler(Protocol):
    """A solver step; ``spacing`` (optional attribute) is the timestep grid it prefers."""

    name: str
    min_steps: int

    def step(self, denoiser: Denoiser, x: torch.Tensor, t: float, t_next: float, state: dict,
             ctx: StepContext, cond, uncond, generator: torch.Generator | None) -> torch.Tensor:
        ...


def timestep_grid(num_train_timesteps: int, steps: int, spacing: str = "trailing") -> list[int]:
    """Model timesteps to evaluate, high noise first (diffusers' timestep_spacing)."""
    n = num_train_timesteps
    if spacing == "trailing":
        ts = [round(n - i * n / steps) - 1 for i in range(steps)]
    elif spacing == "leading":
        ratio = n // steps
        ts = [(steps - 1 - i) * ratio for i in range(steps)]
    elif spacing == "linspace":
        ts = torch.linspace(0, n - 1, steps, dtype=torch.float64).round().long().flip(0).tolist()
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return ts


def continuous_times(schedule, steps: int, spacing: str) -> list[float]:
    """``steps`` continuous times from t = 1 down to t_min inclusive.

    karras: sigma = exp(-lambda) spaced as Karras et al. (2022) Eq. 5 with rho = 7;
    logsnr: uniform in lambda; time_uniform / time_quadratic: uniform in t / sqrt(t)
    (DPM-Solver's skip types); flow: uniform in t, then the flow schedule's shift."""
    is_flow = schedule.is_flow
    if is_flow != (spacing == "flow"):
        raise ValueError(f"the {spacing!r} grid does not fit a "
                         f"{'flow-matching' if is_flow else 'VP'} schedule; use "
                         f"{'flow' if is_flow else 'trailing, karras or logsnr'}")
    t_max, t_min = 1.0, schedule.t_min
    if steps == 1:
        return [t_max]
    u = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    if spacing == "karras":
        s_max, s_min = torch.exp(-schedule.lam(t_max)), torch.exp(-schedule.lam(t_min))
        inv = 1.0 / KARRAS_RHO
        sigmas = (s_max**inv + u * (s_min**inv - s_max**inv)) ** KARRAS_RHO
        ts = schedule.inverse_lambda(-torch.log(sigmas))
    elif spacing == "logsnr":
        lam = schedule.lam(t_max) + u * (schedule.lam(t_min) - schedule.lam(t_max))
        ts = schedule.inverse_lambda(lam)
    elif spacing == "time_uniform":
        ts = t_max + u * (t_min - t_max)
    elif spacing == "time_quadratic":
        ts = (t_max**0.5 + u * (t_min**0.5 - t_max**0.5)) ** 2
    elif spacing == "flow":
        ts = schedule.shifted(t_max + u * (t_min - t_max))
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if spacing != "flow":  # pin the ends against round-off; the flow grid ends at shifted(t_min)
        ts[0], ts[-1] = t_max, t_min
    return [float(t) for t in ts]


FINALS = ("zero", "sigma_min")


@dataclass(eq=False)
class ExplicitGrid:
    """A grid for ``sample_loop`` given as its ``steps + 1`` times, for that step count only."""

    values: list[float]
    name: str = "explicit"

    def times(self, steps: int) -> list[float]:
        if steps != len(self.values) - 1:
            raise ValueError(f"this {self.name} grid has {len(self.values) - 1} steps, not {steps}")
        return list(self.values)


def continuous_grid(denoiser: Denoiser, steps: int, spacing: str = "trailing",
                    timesteps: list[int] | None = None, final: str = "zero") -> list[float]:
    """Continuous times t_0 > t_1 > ... > t_steps: the last is clean data (``final="zero"``)
    or the first training step (``"sigma_min"``, diffusers' ``final_sigmas_type``).

    ``timesteps`` gives the model timesteps explicitly (e.g. a diffusers scheduler's);
    ``spacing`` may also be a grid object with ``times(steps)`` (``optimal_grid.OptimalGrid``)."""
    if final not in FINALS:
        raise ValueError(f"unknown final time {final!r}; choose one of {', '.join(FINALS)}")
    schedule = denoiser.schedule
    if timesteps is None and hasattr(spacing, "times"):
        return _grid_object_times(spacing, steps, final, schedule)
    if spacing == "gits":
        raise ValueError("the gits grid is calibrated per model: pass spacing=OptimalGrid.load(PATH) "
                         "(made by `sdinfer calibrate --method gits`), or generate through a Pipeline "
                         "whose model ships one")
    last = 0.0 if final == "zero" else schedule.t_min
    if timesteps is None and schedule.is_flow and spacing in DISCRETE_SPACINGS:
        raise ValueError(f"the {spacing!r} grid does not fit a flow-matching schedule; use flow")
    if timesteps is None and spacing in CONTINUOUS_SPACINGS:
        times = continuous_times(schedule, steps, spacing)
        if final == "sigma_min" and steps > 1:
            raise ValueError(f"the {spacing} grid ends at sigma_min already; use final='zero'")
        return times + [last]
    model_ts = timesteps if timesteps is not None else \
        timestep_grid(schedule.num_train_timesteps, steps, spacing)
    if len(model_ts) != steps:
        raise ValueError(f"{len(model_ts)} timesteps given for {steps} steps")
    return [float(schedule.continuous_time(m)) for m in model_ts] + [last]


def check_final_fits(schedule, steps: int, spacing, final: str) -> None:
    """The user-facing check of ``final="sigma_min"``: it ends the trailing grid at the first
    training step; continuous and calibrated grids have their own end, and leading and linspace
    end at timestep 0 already (their last step would have zero length, which only diffusers'
    PNDM takes: ``sample_loop`` itself allows it)."""
    if final != "sigma_min":
        return
    if not isinstance(spacing, str) or spacing not in DISCRETE_SPACINGS:
        name = spacing if isinstance(spacing, str) else getattr(spacing, "name", "calibrated")
        raise ValueError(f"final='sigma_min' ends the trailing grid at the first training step; the "
                         f"{name} grid has its own end: use final='zero' or the trailing grid")
    if timestep_grid(schedule.num_train_timesteps, steps, spacing)[-1] <= 0:
        raise ValueError(f"the {spacing} grid's last timestep is 0, the first training step, so with "
                         "final='sigma_min' its last step would have zero length; use final='zero' or "
                         "the trailing grid")


def _grid_object_times(grid, steps: int, final: str, schedule) -> list[float]:
    if final != "zero":
        raise ValueError(f"a {getattr(grid, 'name', 'calibrated')} grid ends at clean data; use final='zero'")
    if schedule.is_flow:
        raise ValueError("calibrated grids are for VP schedules; a flow-matching model uses the flow grid")
    times = list(grid.times(steps))
    if len(times) != steps + 1 or times[-1] != 0.0:
        raise ValueError(f"the grid gave {len(times)} times ending at {times[-1] if times else None} "
                         f"for {steps} steps; it must give steps + 1 ending at 0")
    return times


@torch.no_grad()
def sample_loop(denoiser: Denoiser, sampler: Sampler, x: torch.Tensor, steps: int, cond, uncond,
                generator: torch.Generator | None = None, spacing: str | None = None,
                generation: int = 0, callback: Callable[[int, torch.Tensor], None] | None = None,
                timesteps: list[int] | None = None, final: str = "zero",
                analytic_first_step: bool = False) -> torch.Tensor:
    """Run ``sampler`` from the noise ``x`` over ``steps`` steps; returns the clean sample.
    ``analytic_first_step``: the first step takes the Gaussian-data prediction instead of
    calling the model (``analytic_first_step.py``), so ``steps`` steps cost ``steps - 1``."""
    if steps < sampler.min_steps:
        raise ValueError(f"sampler {sampler.name!r} needs at least {sampler.min_steps} steps, "
                         f"got {steps}")
    schedule = denoiser.schedule
    if spacing is None:
        spacing = schedule.default_spacing if schedule.is_flow else \
            getattr(sampler, "spacing", schedule.default_spacing)
    times = continuous_grid(denoiser, steps, spacing, timesteps, final)
    if analytic_first_step:
        if steps < 2:
            raise ValueError("the analytic first step replaces the first of at least 2 steps; give steps >= 2")
        from .analytic_first_step import AnalyticFirstStep, check_supports
        check_supports(sampler)
        denoiser = AnalyticFirstStep(denoiser, times[0])
    state: dict = {}
    for i in range(steps):
        t, t_next = times[i], times[i + 1]
        ctx = StepContext(step_index=i, num_steps=steps, t=t,
                          model_t=float(denoiser.schedule.model_time(t)), generation=generation,
                          next_model_t=float(denoiser.schedule.model_time(t_next)) if i < steps - 1 else None)
        x = sampler.step(denoiser, x, t, t_next, state, ctx, cond, uncond, generator)
        if callback is not None:
            callback(i, x)
    return x
