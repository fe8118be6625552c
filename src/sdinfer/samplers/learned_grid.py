"""Learned time grids: the discretization of one solver at one step count that minimises that
solver's global error against a fine teacher (LD3: Tong, Hoang, Liu, Van den Broeck & Niepert,
"Learning to Discretize Denoising Diffusion ODEs", ICLR 2025, Eq. 5, the hard objective):

    min over 1 = t_0 > t_1 > ... > t_{N-1} > t_N = 0 of  E_{x_T} || Psi_t(x_T) - Psi*(x_T) ||^2

with Psi_t the N-step solver on the grid t and Psi* the teacher (a fine solve of the same ODE
from the same noise).  Unlike GITS (``optimal_grid.py``), which adds up local errors of a
first-order step, this scores the whole path of the solver that will use it, so it accounts
for how errors propagate and for the solver's order.

LD3 descends on the objective by backpropagating through the solver and the model, and relaxes
the target (its soft teacher) against over-fitting.  Here the N - 1 interior times are searched
without gradients (our samplers take float times): a pattern search in which each interior
time moves a fraction f of the way to either neighbour (so the grid stays ordered), a move is
kept when it lowers the training error, and f halves after a sweep that keeps none; no time
goes below the schedule's first training step (the last interior time moves towards it, not
towards 0).  It starts
from the best fixed grid, and validation trajectories (other prompts and noise) guard against
over-fitting: the learned grid is kept only where its validation error is below the starting
grid's, else the starting grid is stored.

A file (safetensors, beside the model as its ``learned-grid`` artifact, ``models/artifacts.py``) holds one grid per
(sampler, steps); ``LearnedGrids.grid(sampler, steps)`` gives what ``sample_loop`` runs on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..models import artifacts
from .base import ExplicitGrid

KIND = "sdinfer-learned-grid"
SEPARATOR = "|"


def entry_key(sampler: str, steps: int) -> str:
    """The key of one grid: the sampler spec as written (lower case, no spaces) and the steps."""
    return f"{''.join(sampler.lower().split())}{SEPARATOR}{steps}"


@dataclass(eq=False)
class LearnedGrids:
    """Grids by (sampler, steps), each ``steps + 1`` times falling to 0, with how they were found."""

    grids: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, times in self.grids.items():
            _check_times(times, key)
        self.grids = {k: v.double() for k, v in self.grids.items()}

    def entries(self) -> list[tuple[str, int]]:
        return sorted((k.rsplit(SEPARATOR, 1)[0], int(k.rsplit(SEPARATOR, 1)[1])) for k in self.grids)

    def grid(self, sampler: str, steps: int) -> ExplicitGrid:
        key = entry_key(sampler, steps)
        if key not in self.grids:
            have = ", ".join(f"{s} {n}" for s, n in self.entries()) or "none"
            raise KeyError(f"no learned grid for sampler {sampler!r} at {steps} steps (learned: {have})")
        return ExplicitGrid(self.grids[key].tolist(), "learned")

    def add(self, sampler: str, steps: int, times: list[float], info: dict) -> None:
        key = entry_key(sampler, steps)
        grid = torch.tensor(times, dtype=torch.float64)
        _check_times(grid, key)
        self.grids[key] = grid
        self.meta.setdefault("entries", {})[key] = info

    def save(self, path: str | Path) -> None:
        artifacts.write(path, self.grids, {"kind": KIND, "meta": self.meta})

    @classmethod
    def load(cls, path: str | Path) -> "LearnedGrids":
        tensors, meta = artifacts.read(path, "learned-grid", "sdinfer calibrate --method learned-grid",
                                       json_keys=("meta",))
        if meta.get("kind") != KIND or not all(SEPARATOR in k for k in tensors):
            raise ValueError(f"{path} is not a learned-grid file (made by `sdinfer calibrate --method learned-grid`)")
        return cls(tensors, meta.get("meta", {}))


def _check_times(times: torch.Tensor, key: str) -> None:
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"learned grid {key!r} must be a list of at least 2 times, got shape {tuple(times.shape)}")
    if not 0.0 < float(times[0]) <= 1.0 or float(times[-1]) != 0.0 or not bool((times[1:] < times[:-1]).all()):
        raise ValueError(f"learned grid {key!r} must fall strictly from t <= 1 to t = 0")
    if SEPARATOR in key and key.rsplit(SEPARATOR, 1)[1] != str(times.shape[0] - 1):
        raise ValueError(f"learned grid {key!r} has {times.shape[0] - 1} steps")


def search_grid(error: Callable[[list[float]], float], start: list[float], fraction: float = 0.5,
                min_fraction: float = 1 / 32, max_evals: int = 200,
                min_time: float = 0.0) -> tuple[list[float], float, int]:
    """Pattern search for the interior times minimising ``error(times)``; ends and order kept,
    and no interior time below ``min_time`` (the model's first training step: below it the
    model is evaluated at a negative timestep).

    Returns the grid, its error and how many times ``error`` was called (the start included)."""
    _check_start(start, min_time)
    if len(start) < 3:
        error_at_start = error(list(start))
        return list(start), error_at_start, 1  # one step: nothing to move
    times, best, evals = list(start), error(list(start)), 1
    while fraction >= min_fraction and evals < max_evals:
        kept = False
        for i in range(1, len(times) - 1):
            for neighbour in (i - 1, i + 1):
                target = max(times[neighbour], min_time)
                if target == times[i]:
                    continue   # at the floor already
                trial = list(times)
                trial[i] = times[i] + fraction * (target - times[i])
                value = error(trial)
                evals += 1
                if value < best:
                    times, best, kept = trial, value, True
                    break
                if evals >= max_evals:
                    return times, best, evals
        if not kept:
            fraction /= 2
    return times, best, evals


def _check_start(start: list[float], min_time: float) -> None:
    if len(start) < 2 or not all(a > b for a, b in zip(start, start[1:])):
        raise ValueError(f"a start grid must fall strictly; got {list(start)}")
    if any(t < min_time for t in start[1:-1]):
        raise ValueError(f"a start grid's interior times must be >= {min_time:g} (the model's first "
                         f"training step); got {list(start)}")


def learn_grid(train_error: Callable[[list[float]], float], starts: dict[str, list[float]],
               validation_error: Callable[[list[float]], float] | None = None,
               max_evals: int = 150, min_time: float = 0.0) -> tuple[list[float], dict]:
    """The searched grid from the best of ``starts`` (by training error) and how it was found;
    with ``validation_error``, the start instead where the search does not lower it.  Interior
    times stay >= ``min_time``; an error that is not a finite number counts as infinite (a grid
    on which the solver diverges loses), and starts that all diverge are an error."""
    def finite(fn):
        def value(times: list[float]) -> float:
            v = float(fn(times))
            return v if math.isfinite(v) else math.inf
        return value

    train_error = finite(train_error)
    for times in starts.values():
        _check_start(times, min_time)
    start_errors = {name: train_error(list(times)) for name, times in starts.items()}
    start_name = min(start_errors, key=start_errors.get)
    if not math.isfinite(start_errors[start_name]):
        raise ValueError(f"the solver diverged on every start grid ({', '.join(starts)}); no grid to learn from")
    start = list(starts[start_name])
    times, value, evals = search_grid(train_error, start, max_evals=max_evals, min_time=min_time)
    info = {"start": start_name, "train_start": start_errors[start_name], "train_learned": value,
            "evaluations": evals + len(starts)}
    if validation_error is not None:
        validation_error = finite(validation_error)
        before, after = validation_error(start), validation_error(times)
        info.update(validation_start=before, validation_learned=after,
                    kept="learned" if after < before else "start")
        if after >= before:
            times = start
    return times, info
