"""An accurate solution of the probability-flow ODE, for calibration: the reference that
``choose_corrector`` ranks DPM-Solver-v3's corrector modes against and the teacher of GITS
(``optimal_grid.compute_grid``) and of learned grids (``calibrate.calibrate_learned_grids``).

The classical fourth-order Runge-Kutta method in the half log-SNR lambda on y = x / sigma, the
data-prediction form of the ODE (Lu et al., DPM-Solver++, Eq. 4, which stays well-conditioned
under large guidance):

    dy / d lambda = e^lambda x0(sigma_lambda y, t_lambda),

with equal steps in lambda between the requested times, at most ``step`` long, accumulated in
float64 whatever the model's dtype.  Step doubling checks it: the solve is repeated with every
interval's step count doubled until two successive solves agree within ``tolerance`` (the
largest RMS difference over the returned states); the finer one is returned.  At fourth order
its own error is about a fifteenth of that difference.  A solve that does not agree by
``max_steps`` steps, or whose difference stops falling (two halvings of the step in a row that do
not halve it: the model's output is not smooth enough in t at that scale), is an error naming the difference
reached, never a silent wrong reference.

Time 0 is the end every sampler's last step takes: the data prediction at the last positive
time (the schedule's first training step t_min unless told otherwise), since the model is not
defined below t_min.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..context import StepContext
from ..errors import UserError

TOLERANCE = 1e-5      # RMS difference between the solves with N and 2N steps
START_STEP = 0.2      # the first solve's largest step in lambda
MAX_STEPS = 2000      # Runge-Kutta steps (4 evaluations each) of the finest solve allowed


class ReferenceNotConverged(UserError):
    """Two successive solves still disagreed at the step limit."""


@dataclass
class ReferenceSolution:
    """The states at the requested times (the first is the noise given), the Runge-Kutta steps
    of the returned solve, its RMS difference to the solve with half as many, and the model
    evaluations of all solves."""

    times: list[float]
    states: list[torch.Tensor]
    steps: int
    difference: float
    evaluations: int

    @property
    def final(self) -> torch.Tensor:
        return self.states[-1]


def _check_times(schedule, times: list[float]) -> list[float]:
    times = [float(t) for t in times]
    if len(times) < 2 or not all(a > b for a, b in zip(times, times[1:])):
        raise ValueError(f"the reference solves over at least 2 times falling strictly from noise; got {times}")
    if times[0] > 1.0:
        raise ValueError(f"the reference starts at t <= 1, got {times[0]}")
    positive = [t for t in times if t != 0.0]
    if len(positive) < 1 or positive[-1] < schedule.t_min - 1e-12:
        raise ValueError(f"the reference solves down to the schedule's first training step t = "
                         f"{schedule.t_min:g} (then 0, the data prediction there); got {times}")
    return times


def solve_reference(denoiser, x_T: torch.Tensor, cond=None, uncond=None, times: list[float] | None = None,
                    tolerance: float = TOLERANCE, step: float = START_STEP,
                    max_steps: int = MAX_STEPS) -> ReferenceSolution:
    """The probability-flow ODE of ``denoiser`` (with its guidance, on ``cond`` / ``uncond``) from
    ``x_T`` at ``times[0]`` through ``times`` (default: 1, t_min, 0), solved until two solves
    agree within ``tolerance``."""
    sched = denoiser.schedule
    if sched.is_flow:
        raise ValueError("the calibration reference is written for VP schedules")
    if tolerance <= 0 or step <= 0 or max_steps < 1:
        raise ValueError(f"the reference needs tolerance > 0, step > 0 and max_steps >= 1; got "
                         f"{tolerance}, {step}, {max_steps}")
    times = _check_times(sched, [1.0, sched.t_min, 0.0] if times is None else times)
    positive = [t for t in times if t != 0.0]
    lams = [float(sched.lam(t)) for t in positive]
    counts = [max(1, math.ceil((b - a) / step)) for a, b in zip(lams, lams[1:])]
    evaluations, difference, previous, stalled = 0, None, None, 0
    coarse, n = _solve(denoiser, x_T, cond, uncond, times, counts)
    evaluations += n
    while True:
        counts = [2 * c for c in counts]
        if sum(counts) > max_steps:
            if difference is None:
                raise ReferenceNotConverged(
                    f"the calibration reference needs more than max_steps = {max_steps} Runge-Kutta steps "
                    f"to check itself over {len(counts)} intervals; raise max_steps")
            raise ReferenceNotConverged(
                f"the calibration reference did not converge: at {sum(counts) // 2} Runge-Kutta steps it "
                f"still moved by {difference:.3g} RMS when the steps were halved (tolerance {tolerance:g}); "
                "raise max_steps or the tolerance")
        fine, n = _solve(denoiser, x_T, cond, uncond, times, counts)
        evaluations += n
        difference = max(float((a.double() - b.double()).square().mean().sqrt())
                         for a, b in zip(coarse[1:], fine[1:]))
        if not math.isfinite(difference):
            raise FloatingPointError("the calibration reference diverged (a non-finite state)")
        if difference <= tolerance:
            return ReferenceSolution(times, fine, sum(counts), difference, evaluations)
        stalled = stalled + 1 if previous is not None and difference > previous / 2 else 0
        if stalled == 2:
            raise ReferenceNotConverged(
                f"the calibration reference stopped converging: halving its step twice more moved it by "
                f"{difference:.3g} RMS at {sum(counts)} Runge-Kutta steps, above the tolerance {tolerance:g}; "
                "the model is not smooth enough in t for it: raise the tolerance")
        coarse, previous = fine, difference


def _solve(denoiser, x_T, cond, uncond, times, counts) -> tuple[list[torch.Tensor], int]:
    """One fixed-step solve: the states at ``times`` and the evaluations it took."""
    sched = denoiser.schedule
    total = 4 * sum(counts) + (1 if times[-1] == 0.0 else 0)
    calls = 0

    def x0_at(lam: float, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal calls
        t = float(sched.inverse_lambda(torch.tensor(lam, dtype=torch.float64)))
        sigma = float(sched.sigma(t))
        x = (sigma * y).to(x_T.dtype)
        ctx = StepContext(step_index=calls, num_steps=total, t=t, model_t=float(sched.model_time(t)))
        calls += 1
        return denoiser(x, t, cond, uncond, ctx).x0.double(), x

    y = x_T.double() / float(sched.sigma(times[0]))
    states = [x_T.clone()]
    lam = float(sched.lam(times[0]))
    for i, c in enumerate(counts):
        lam_end = float(sched.lam(times[i + 1]))
        h = (lam_end - lam) / c
        for k in range(c):
            a = lam + k * h

            def f(at: float, state: torch.Tensor) -> torch.Tensor:
                return math.exp(at) * x0_at(at, state)[0]

            k1 = f(a, y)
            k2 = f(a + h / 2, y + (h / 2) * k1)
            k3 = f(a + h / 2, y + (h / 2) * k2)
            k4 = f(a + h, y + h * k3)
            y = y + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        lam = lam_end
        states.append((float(sched.sigma(times[i + 1])) * y).to(x_T.dtype))
    if times[-1] == 0.0:
        states.append(x0_at(lam, y)[0].to(x_T.dtype))
    return states, calls
