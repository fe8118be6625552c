"""``sdinfer.sample``: any sampler of the project on any model callable.

    x0 = sdinfer.sample(model, x_T, schedule=NoiseSchedule.from_diffusers_config(cfg),
                        sampler="dpm-solver++", steps=10, prediction_type="epsilon")

``model(x, t)`` (or ``model(x, t, cond)`` when ``cond`` is given) takes t in the
model's own timestep convention (diffusers' 0..999, or ``sigma * 1000`` for
flow matching).  ``schedule`` is a ``NoiseSchedule``, a ``FlowMatchSchedule``, a
diffusers scheduler or its config.
"""

from __future__ import annotations

from typing import Callable

import torch

from .denoiser import Denoiser
from .devices import cast_model_fn, work_dtype
from .samplers import get_sampler, sample_loop
from .samplers.base import check_final_fits
from .samplers.diffusers_scheduler import DiffusersSampler
from .schedules import FlowMatchSchedule, NoiseSchedule, schedule_from_diffusers


def as_schedule(schedule) -> NoiseSchedule | FlowMatchSchedule:
    if isinstance(schedule, (NoiseSchedule, FlowMatchSchedule)):
        return schedule
    if hasattr(schedule, "config") or isinstance(schedule, dict):
        return schedule_from_diffusers(schedule)
    raise TypeError(f"schedule must be a NoiseSchedule, a FlowMatchSchedule, a diffusers scheduler "
                    f"or its config, not {type(schedule).__name__}")


def sample(model: Callable, x_T: torch.Tensor, schedule, sampler="dpm-solver++",
           steps: int = 10, prediction_type: str = "epsilon", cond=None, uncond=None,
           guidance_scale: float = 1.0, spacing=None,
           timesteps: list[float] | None = None, final: str = "zero",
           generator: torch.Generator | None = None, analytic_first_step: bool = False,
           auto=None, **options) -> torch.Tensor:
    """Sample from ``x_T`` with ``sampler``: a name (extra keyword options go to it), a
    sampler object, or a diffusers scheduler object (run one model call per step).
    ``"dpm-solver-12"`` / ``"dpm-solver-23"`` (alias ``"dpm-solver-adaptive"``, options
    ``rtol``, ``atol``, ...) choose their own steps: ``steps`` does not apply to them;
    ``"paradigms"`` / ``"parataa"`` run the ``steps`` steps in parallel rounds.  ``spacing``: a
    grid name, or a grid object such as a GITS ``OptimalGrid`` (``samplers.optimal_grid``).  ``analytic_first_step``: the first step
    without a model call (``samplers.analytic_first_step``).  ``sampler="auto"``: for ``steps``
    model evaluations, what an auto-sampler table chose (``auto``: an ``AutoTable`` with its
    aids, or a model folder whose table at ``guidance_scale`` is used; ``auto_sampler.py``)."""
    sched = as_schedule(schedule)
    given_dtype = x_T.dtype
    x_T = x_T.to(work_dtype(given_dtype))   # the sampler's arithmetic in float32 for a half x_T

    model_fn = cast_model_fn(lambda x, t, text: model(x, t) if text is None else model(x, t, text),
                             given_dtype)

    if isinstance(sampler, str) and sampler == "auto":
        solver, spacing, analytic_first_step, steps = _auto(auto, guidance_scale, steps, spacing,
                                                            analytic_first_step, options)
    elif isinstance(sampler, str):
        extra = ",".join(f"{k}={v}" for k, v in options.items())
        spec = sampler if not extra else sampler + ("," if ":" in sampler else ":") + extra
        solver = get_sampler(spec)
    elif hasattr(sampler, "set_timesteps") and hasattr(sampler, "step"):  # a diffusers scheduler
        solver = DiffusersSampler(sampler)
    elif hasattr(sampler, "sample") or hasattr(sampler, "step"):
        solver = sampler
    else:
        raise TypeError(f"sampler must be a name such as 'dpm-solver++', an sdinfer sampler or a "
                        f"diffusers scheduler, not {type(sampler).__name__}")

    if timesteps is None and not sched.is_flow:
        check_final_fits(sched, steps, spacing if spacing is not None else
                         getattr(solver, "spacing", sched.default_spacing), final)
    den = Denoiser(model_fn, sched, prediction_type, guidance_scale)
    return sample_loop(den, solver, x_T, steps, cond, uncond, generator=generator,
                       spacing=spacing, timesteps=timesteps, final=final,
                       analytic_first_step=analytic_first_step).to(given_dtype)


def _auto(auto, guidance_scale: float, nfe: int, spacing, analytic_first_step: bool, options: dict):
    """The sampler, grid, first step and steps an auto-sampler table chose for ``nfe``."""
    from .auto_sampler import AutoTable, resolve, table_for
    from .errors import UserError

    if spacing is not None or analytic_first_step or options:
        raise UserError("sampler='auto' chooses the grid, the first step and the options itself; "
                        "leave spacing, analytic_first_step and sampler options unset")
    if isinstance(auto, AutoTable):
        return resolve(auto, nfe)
    if auto is None:
        raise UserError("sampler='auto' needs auto=: an AutoTable, or the model folder holding one "
                        "(made by `sdinfer calibrate auto`)")
    return resolve(table_for(auto, guidance_scale), nfe, folder=auto)
