"""Samplers against one noise schedule and one bound model (``base.BoundModel``): step
functions (``base.StepSampler``), and samplers that run their own loop over the steps (the
adaptive DPM-Solver, ParaDiGMS, ParaTAA), all in the one registry ``SAMPLERS``."""

from __future__ import annotations

from ..specs import parse_spec
from .base import (BoundModel, Sampler, SamplerState, StepSampler, continuous_grid, sample_loop,
                   timestep_grid)
from .ddim import DDIM
from .ddpm import DDPM
from .dpm_solver import DPMSolverMultistep
from .dpm_solver_singlestep import AdaptiveDPMSolver, DPMSolverSinglestep
from .dpm_solver_v3 import DPMSolverV3
from .karras import Euler, Heun
from .paradigms import ParaDiGMS
from .parataa import ParaTAA
from .pndm import PLMS
from .sampler_schedule import SamplerSchedule, is_schedule_spec
from .unipc import UniPC

SAMPLERS = {
    "ddim": lambda **kw: DDIM(**kw),
    "ddpm": lambda **kw: DDPM(**kw),
    "dpm-solver++": lambda **kw: DPMSolverMultistep(**{"order": 2, **kw}),
    "dpm-solver": lambda **kw: DPMSolverMultistep(**{"order": 2, **kw}, algorithm="dpmsolver",
                                                  name="dpm-solver"),
    "dpm-solver++-2m": lambda **kw: DPMSolverMultistep(**{"order": 2, **kw}, name="dpm-solver++-2m"),
    "dpm-solver++-3m": lambda **kw: DPMSolverMultistep(**{"order": 3, **kw}, name="dpm-solver++-3m"),
    "dpm-solver++-sde": lambda **kw: DPMSolverMultistep(**{"order": 2, **kw}, sde=True,
                                                        name="dpm-solver++-sde"),
    "dpm-solver++-singlestep": lambda **kw: DPMSolverSinglestep(**{"order": 2, **kw}),
    "dpm-solver++-2s": lambda **kw: DPMSolverSinglestep(**kw, order=2, name="dpm-solver++-2s"),
    "dpm-solver-singlestep": lambda **kw: DPMSolverSinglestep(**{"order": 2, **kw}, algorithm="dpmsolver",
                                                              name="dpm-solver-singlestep"),
    "dpm-solver-v3": lambda **kw: DPMSolverV3(**kw),
    "unipc": lambda **kw: UniPC(**kw),
    "euler": lambda **kw: Euler(**kw),
    "heun": lambda **kw: Heun(**kw),
    "plms": lambda **kw: PLMS(**kw),
    # their own loops: the adaptive DPM-Solver chooses its steps (``steps`` does not apply);
    # ParaDiGMS and ParaTAA evaluate many of the ``steps`` steps in one batched model call
    "dpm-solver-12": lambda **kw: AdaptiveDPMSolver(**kw, order=2, name="dpm-solver-12"),
    "dpm-solver-23": lambda **kw: AdaptiveDPMSolver(**kw, order=3, name="dpm-solver-23"),
    "dpm-solver-adaptive": lambda **kw: AdaptiveDPMSolver(**kw),
    "paradigms": lambda **kw: ParaDiGMS(**kw),
    "parataa": lambda **kw: ParaTAA(**kw),
}


def get_sampler(spec: str) -> Sampler:
    """A sampler from its name with options, e.g. ``ddim`` or ``ddim:eta=0.5``, or a schedule
    of samplers by step range, e.g. ``ddim:0-10,dpm-solver++:10-20`` or ``sampler-scheduler``."""
    if is_schedule_spec(spec):
        return SamplerSchedule(spec)
    name = spec.partition(":")[0].strip().lower()
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(sorted(SAMPLERS))}")
    _, kwargs = parse_spec(spec, "sampler")
    try:
        return SAMPLERS[name](**kwargs)
    except TypeError:
        raise ValueError(f"sampler {name!r} has no option among {sorted(kwargs)}") from None



__all__ = ["Sampler", "StepSampler", "SamplerState", "BoundModel", "SAMPLERS", "get_sampler", "sample_loop",
           "timestep_grid", "continuous_grid", "DDIM", "DDPM", "DPMSolverMultistep", "DPMSolverSinglestep",
           "DPMSolverV3", "UniPC", "Euler", "Heun", "PLMS", "AdaptiveDPMSolver", "ParaDiGMS", "ParaTAA"]
