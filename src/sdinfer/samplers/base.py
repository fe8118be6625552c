"""The sampler interface, the timestep grid and the sampling loop.

``sample_loop`` binds the denoiser to its text conditioning: a sampler sees
``model(x, t) -> Prediction`` (``model.raw(x, t)`` for the model's own output,
``model.schedule`` for the noise schedule), as k-diffusion's loop bodies do.  Most
samplers are a step function ``step(model, x, t, t_next, state) -> x_next`` over
continuous times of a ``NoiseSchedule``; their multistep history lives in ``state``, a
``SamplerState`` (a dict) the loop creates per generation and on which it sets the step
index, the step count and the generator.  ``sample(model, x, times, state)`` runs a
whole generation: its default (``StepSampler``) loops over ``step``; samplers that choose
their own steps (adaptive DPM-Solver) or evaluate many steps in one call (ParaDiGMS,
ParaTAA) write their own.  Every model evaluation runs inside a ``StepContext`` that the
loop sets (``BoundModel.at_step``) and accelerators read (``context.current_step``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..context import StepContext, current_step, step_context
from ..denoiser import Denoiser, Prediction
from ..models.calling import concat_text

DISCRETE_SPACINGS = ("trailing", "leading", "linspace")
CONTINUOUS_SPACINGS = ("karras", "logsnr", "time_uniform", "time_quadratic", "flow")
SPACINGS = DISCRETE_SPACINGS + CONTINUOUS_SPACINGS
KARRAS_RHO = 7.0


Callback = Callable[[int, torch.Tensor], None]


class BoundModel:
    """The denoiser with its text conditioning bound: ``model(x, t)`` is the (guided)
    prediction at continuous time ``t`` (a number, or a 1-D tensor of one time per sample),
    evaluated in the step context the loop set (``at_step``)."""

    def __init__(self, denoiser: Denoiser, cond=None, uncond=None, generation: int = 0,
                 evaluations: int = 1):
        self.denoiser, self.cond, self.uncond = denoiser, cond, uncond
        self.generation = generation
        self.evaluations = evaluations   # sampler steps in one call (``repeated``)

    @property
    def schedule(self):
        return self.denoiser.schedule

    @property
    def nfe(self) -> int:
        return self.denoiser.nfe

    def _context(self) -> StepContext:
        ctx = current_step()
        if ctx is None:
            raise RuntimeError("the model was called outside a sampling step; a sampler's own "
                               "sample() wraps each evaluation in model.at_step(...)")
        return ctx

    def __call__(self, x: torch.Tensor, t) -> Prediction:
        return self.denoiser(x, t, self.cond, self.uncond, self._context(),
                             evaluations=self.evaluations)

    def raw(self, x: torch.Tensor, t) -> torch.Tensor:
        """The (guided) model output in the model's own prediction type."""
        return self.denoiser.raw(x, t, self.cond, self.uncond, self._context(),
                                 evaluations=self.evaluations)

    def repeated(self, times: int) -> "BoundModel":
        """The model on a batch of ``times`` stacked copies of the samples (several steps of
        one trajectory in one call): the text repeated, each call counted as ``times``
        evaluations."""
        def repeat(text):
            return None if text is None else concat_text(*([text] * times))
        return BoundModel(self.denoiser, repeat(self.cond), repeat(self.uncond), self.generation,
                          self.evaluations * times)

    def at_step(self, index: int, num_steps: int, t: float, t_next: float | None = None):
        """A context manager: the model evaluations inside it belong to step ``index`` of
        ``num_steps`` (0 where the sampler does not know its count), at time ``t``."""
        sched = self.schedule
        next_model_t = None
        if t_next is not None and index < num_steps - 1:
            next_model_t = float(sched.model_time(t_next))
        return step_context(StepContext(step_index=index, num_steps=num_steps, t=t,
                                        model_t=float(sched.model_time(t)),
                                        generation=self.generation, next_model_t=next_model_t))


class SamplerState(dict):
    """One generation's sampler state: a dict for the sampler's own history, and the loop's
    ``step_index``, ``num_steps`` (of the step being taken) and ``generator`` (for the
    stochastic samplers)."""

    def __init__(self, generator: torch.Generator | None = None, step_index: int = 0,
                 num_steps: int = 0):
        super().__init__()
        self.generator, self.step_index, self.num_steps = generator, step_index, num_steps

    def child(self, key, step_index: int, num_steps: int) -> "SamplerState":
        """The state kept under ``key`` (created on first use), at its own step index and count
        (a segment of a ``SamplerSchedule``), sharing the generator."""
        sub = self.get(key)
        if sub is None:
            sub = self[key] = SamplerState(self.generator)
        sub.step_index, sub.num_steps = step_index, num_steps
        return sub


class Sampler(Protocol):
    """What the loop runs: ``sample`` a whole generation over the grid ``times`` (its
    ``len(times) - 1`` steps, from noise at ``times[0]``), calling ``callback(i, x)`` as
    step ``i`` is done; ``spacing`` (optional attribute) is the grid it prefers."""

    name: str
    min_steps: int

    def sample(self, model: BoundModel, x: torch.Tensor, times: list[float], state: SamplerState,
               callback: Callback | None = None) -> torch.Tensor:
        ...


def run_steps(sampler, model: BoundModel, x: torch.Tensor, times: list[float], state: SamplerState,
              callback: Callback | None = None, start: int = 0) -> torch.Tensor:
    """One ``sampler.step(model, x, t, t_next, state)`` per step of the grid, each in its step
    context; ``start``: the first step taken (``x`` is then the state at ``times[start]``; the
    step indices stay those of the whole grid, and a multistep sampler's history begins empty
    there, as at step 0)."""
    steps = len(times) - 1
    for i in range(start, steps):
        t, t_next = times[i], times[i + 1]
        state.step_index, state.num_steps = i, steps
        with model.at_step(i, steps, t, t_next):
            x = sampler.step(model, x, t, t_next, state)
        if callback is not None:
            callback(i, x)
    return x


class StepSampler:
    """Base of the samplers that advance one grid step at a time: they define
    ``step(model, x, t, t_next, state) -> x_next``, and ``sample`` loops over it."""

    def sample(self, model: BoundModel, x: torch.Tensor, times: list[float], state: SamplerState,
               callback: Callback | None = None) -> torch.Tensor:
        return run_steps(self, model, x, times, state, callback)


def steps_one_by_one(sampler) -> bool:
    """Whether ``sampler`` is driven step by step (it has a ``step`` and the default ``sample``),
    as the analytic first step, sampler schedules and diffusers' scheduler loop need."""
    own = getattr(type(sampler), "sample", None)
    return hasattr(sampler, "step") and (own is None or own is StepSampler.sample)


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
                analytic_first_step: bool = False, start: int = 0) -> torch.Tensor:
    """Run ``sampler`` from the noise ``x`` over ``steps`` steps; returns the clean sample.
    ``analytic_first_step``: the first step takes the Gaussian-data prediction instead of
    calling the model (``analytic_first_step.py``), so ``steps`` steps cost ``steps - 1``.
    A sampler that chooses its own steps (``chooses_steps``, the adaptive DPM-Solver) takes
    the grid's ends only and its own number of evaluations (``denoiser.nfe``).
    ``start``: resume at step ``start`` of the same grid, ``x`` being the latents there (the
    steps before it are not run; step-by-step samplers only, their history restarting there)."""
    if steps < sampler.min_steps:
        raise ValueError(f"sampler {sampler.name!r} needs at least {sampler.min_steps} steps, "
                         f"got {steps}")
    if start:
        if not 0 <= start < steps:
            raise ValueError(f"a run of {steps} steps resumes at a step from 0 to {steps - 1}, not {start}")
        if not steps_one_by_one(sampler) or not getattr(sampler, "resumable", True):
            raise ValueError(f"sampler {sampler.name!r} cannot resume mid-trajectory (it runs its own "
                             "loop or keeps its own timesteps); use a step-by-step sampler such as ddim "
                             "or dpm-solver++")
    schedule = denoiser.schedule
    if spacing is None:
        spacing = schedule.default_spacing if schedule.is_flow else \
            getattr(sampler, "spacing", schedule.default_spacing)
    times = continuous_grid(denoiser, steps, spacing, timesteps, final)
    model = BoundModel(denoiser, cond, uncond, generation)
    if analytic_first_step:
        if steps < 2:
            raise ValueError("the analytic first step replaces the first of at least 2 steps; give steps >= 2")
        from .analytic_first_step import AnalyticFirstStep, check_supports
        check_supports(sampler)
        model = AnalyticFirstStep(model, times[0])
    state = SamplerState(generator)
    if start:
        return run_steps(sampler, model, x, times, state, callback, start=start)
    if hasattr(sampler, "sample"):
        return sampler.sample(model, x, times, state, callback)
    return run_steps(sampler, model, x, times, state, callback)
