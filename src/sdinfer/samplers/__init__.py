"""Samplers: step functions against one noise schedule and one denoiser."""

from __future__ import annotations

from .base import Sampler, continuous_grid, sample_loop, timestep_grid
from .ddim import DDIM
from .dpm_solver import DPMSolverMultistep

SAMPLERS = {
    "ddim": lambda **kw: DDIM(**kw),
    "dpm-solver++": lambda **kw: DPMSolverMultistep(**{"order": 2, **kw}),
    "dpm-solver": lambda **kw: DPMSolverMultistep(**{"order": 2, **kw}, algorithm="dpmsolver",
                                                  name="dpm-solver"),
}


def get_sampler(spec: str) -> Sampler:
    """A sampler from its name with options, e.g. ``ddim`` or ``ddim:eta=0.5``."""
    name, _, opts = spec.partition(":")
    name = name.strip().lower()
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(sorted(SAMPLERS))}")
    kwargs = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"sampler option {item!r} must look like key=value")
        try:
            kwargs[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"sampler option {key!r} needs a number, got {value!r}") from None
    try:
        return SAMPLERS[name](**kwargs)
    except TypeError:
        raise ValueError(f"sampler {name!r} has no option among {sorted(kwargs)}") from None


__all__ = ["Sampler", "SAMPLERS", "get_sampler", "sample_loop", "timestep_grid", "continuous_grid", "DDIM", "DPMSolverMultistep"]
