"""Singlestep DPM-Solver / DPM-Solver++ (orders 1-3) and the adaptive DPM-Solver-12 / 23.

DPM-Solver (Lu et al., NeurIPS 2022), Algorithms 1 and 2 ("DPM-Solver-2/3"): a
step from s to t of order k evaluates the model at s and at k - 1 intermediate
times s < u_1 < u_2 < t, reached by lower-order updates *from s*, and then
updates from s with the divided differences of those evaluations:

  order 2:  D1 = (m(u_1) - m(s)) / r_1                     r_i = (lambda_{u_i} - lambda_s) / h
  order 3:  D1 = (m(u_2) - m(s)) / r_2   (Alg. 2; the "midpoint" form)
            or the quadratic fit through m(s), m(u_1), m(u_2) ("heun": D1, D2)

and ``exponential_update`` (exponential_integrator.py) applies the exponential integrator.
As in diffusers' DPMSolverSinglestepScheduler the intermediate times are the
grid's own points: the steps fall into blocks of orders [1, 2, 3], [1, 2], ...;
within a block every grid step costs one evaluation and restarts from the
block's first sample.  On a grid uniform in lambda the block [1, 2, 3] is the
paper's DPM-Solver-3 with r_1 = 1/3, r_2 = 2/3.

``dpm_solver_adaptive`` is the paper's Algorithm 4 (App. C): a step of order k
and one of order k - 1 share their evaluations; their difference, normalised by
max(atol, rtol * max(|x_lower|, |x_prev|)), is the error E (RMS, the worst sample's); a step with E <= 1
is accepted, and h <- theta h E^{-1/k} (in lambda) either way.  As a sampler
(``AdaptiveDPMSolver``: ``dpm-solver-12``, ``dpm-solver-23``) it ignores the loop's step count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import StepSampler
from .dpm_solver import ALGORITHMS, check_order_and_algorithm
from .exponential_integrator import block_update, singlestep_update

SOLVER_TYPES = ("midpoint", "heun")


def order_list(steps: int, order: int, lower_order_final: bool = True) -> list[int]:
    """The order of each grid step: blocks [1, .., order], a shorter last block if needed,
    and (with ``lower_order_final``) the last block kept below third order."""
    orders = [k for _ in range(steps // order) for k in range(1, order + 1)]
    orders += list(range(1, steps - len(orders) + 1))
    if lower_order_final and order == 3 and steps % 3 == 0:
        orders[-3:] = [1, 2, 1]
    elif lower_order_final and order == 2 and steps % 2 == 0:
        orders[-2:] = [1, 1]
    return orders


@dataclass
class DPMSolverSinglestep(StepSampler):
    order: int = 2
    algorithm: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    name: str = "dpm-solver++-singlestep"
    min_steps: int = 1

    def __post_init__(self) -> None:
        self.order = check_order_and_algorithm(self.name, self.order, self.algorithm)
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(f"unknown solver_type {self.solver_type!r}; choose midpoint or heun")

    def step(self, model, x, t, t_next, state):
        pred = model(x, t)
        sched = model.schedule
        data = self.algorithm == "dpmsolver++"
        if "orders" not in state:
            state["orders"] = order_list(state.num_steps, self.order, self.lower_order_final)
        if t_next == 0.0:
            return pred.x0
        order = state["orders"][state.step_index]
        out = pred.x0 if data else pred.eps
        if order == 1 or "block" not in state:   # a block's first step (or a run resumed inside one)
            state["block"] = (x, t, float(sched.lam(t)), [])
        x_s, s, lam_s, outputs = state["block"]
        outputs.append((float(sched.lam(t)), out))
        return block_update(sched, x_s, s, lam_s, outputs, t_next, data, self.solver_type)


@dataclass
class AdaptiveResult:
    x: torch.Tensor
    nfe: int
    accepted: int
    rejected: int


@dataclass
class AdaptiveDPMSolver:
    """DPM-Solver-12 (``order=2``) or -23 (``order=3``) as a sampler: it chooses its own steps,
    so the loop's step count and grid do not apply (it runs from t = 1 to ``t_end``; the number
    of model evaluations is its own, in ``denoiser.nfe``).  Registered as ``dpm-solver-12``,
    ``dpm-solver-23`` and ``dpm-solver-adaptive`` (order 2 unless given)."""

    order: int = 2
    algorithm: str = "dpmsolver++"
    rtol: float = 0.05
    atol: float = 0.0078
    h_init: float = 0.05
    theta: float = 0.9
    t_end: float | None = None
    denoise_final: bool = True
    max_trials: int = 10_000
    name: str = "dpm-solver-adaptive"
    min_steps: int = 1
    chooses_steps = True   # the Pipeline's progress has no known total

    def __post_init__(self) -> None:
        check_adaptive_options(self.order, self.algorithm, self.rtol, self.atol, self.h_init, self.theta)

    def sample(self, model, x, times, state, callback=None) -> torch.Tensor:
        return adaptive_solve(model, x, self.order, self.algorithm, self.rtol, self.atol, self.h_init,
                              self.theta, self.t_end, self.denoise_final, self.max_trials, callback).x


def check_adaptive_options(order, algorithm, rtol, atol, h_init, theta) -> None:
    if order not in (2, 3):
        raise ValueError(f"adaptive DPM-Solver has orders 2 (DPM-Solver-12) and 3 (-23), not {order}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown DPM-Solver algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if rtol <= 0 or atol <= 0 or h_init <= 0 or not 0 < theta <= 1:
        raise ValueError("adaptive DPM-Solver needs rtol > 0, atol > 0, h_init > 0, 0 < theta <= 1")


def dpm_solver_adaptive(denoiser, x: torch.Tensor, cond=None, uncond=None, order: int = 2,
                        algorithm: str = "dpmsolver++", rtol: float = 0.05, atol: float = 0.0078,
                        h_init: float = 0.05, theta: float = 0.9, t_end: float | None = None,
                        denoise_final: bool = True, max_trials: int = 10_000,
                        generation: int = 0) -> AdaptiveResult:
    """DPM-Solver-12 (order 2) or -23 (order 3) from t = 1 to ``t_end`` (default: the
    schedule's t_min); with ``denoise_final`` one more evaluation returns the data
    prediction there.  ``atol`` is in data units (0.0078 = 1/128, the paper's value for
    images in [-1, 1]).  A rejected step keeps its start's evaluation (the reference code
    evaluates it again)."""
    from .base import BoundModel

    check_adaptive_options(order, algorithm, rtol, atol, h_init, theta)
    return adaptive_solve(BoundModel(denoiser, cond, uncond, generation), x, order, algorithm, rtol,
                          atol, h_init, theta, t_end, denoise_final, max_trials)


def adaptive_solve(model, x: torch.Tensor, order: int, algorithm: str, rtol: float, atol: float,
                   h_init: float, theta: float, t_end: float | None, denoise_final: bool,
                   max_trials: int, callback=None) -> AdaptiveResult:
    """``dpm_solver_adaptive`` on a bound model (``base.BoundModel``); ``callback(i, x)`` after
    the i-th accepted step.  Each evaluation's step context has the accepted steps so far as
    its index and 0 as the step count (unknown)."""
    sched = model.schedule
    data = algorithm == "dpmsolver++"
    t_end = sched.t_min if t_end is None else t_end
    lam_end = float(sched.lam(t_end))
    s, lam_s, h = 1.0, float(sched.lam(1.0)), h_init
    counts = {"nfe": 0, "accepted": 0, "rejected": 0}

    def evaluate(x_in, t_in):
        counts["nfe"] += 1
        with model.at_step(counts["accepted"], 0, t_in):
            return model(x_in, t_in)

    def time_at(lam):
        return float(sched.inverse_lambda(torch.tensor(lam, dtype=torch.float64)))

    def model_out(p):
        return p.x0 if data else p.eps

    x_s, x_prev, m_s = x, x, None
    while lam_end - lam_s > 1e-5 and counts["accepted"] + counts["rejected"] < max_trials:
        h = min(h, lam_end - lam_s)
        t = time_at(lam_s + h)
        if m_s is None:
            m_s = model_out(evaluate(x_s, s))
        # the higher solution is DPM-Solver-k; the lower one, DPM-Solver-(k-1), reuses its
        # first evaluations (order 3: r = 1/3 serves both)
        higher, outputs = singlestep_update(lambda x_u, u: model_out(evaluate(x_u, u)), sched,
                                            x_s, s, t, m_s, order, data)
        lower = block_update(sched, x_s, s, lam_s, outputs[:order - 1], t, data, "midpoint")
        delta = torch.clamp(rtol * torch.maximum(lower.abs(), x_prev.abs()), min=atol)
        err = float(((higher - lower) / delta).square().flatten(1).mean(1).sqrt().max())
        if err <= 1.0:
            x_s, x_prev, s, lam_s, m_s = higher, lower, t, lam_s + h, None
            counts["accepted"] += 1
            if callback is not None:
                callback(counts["accepted"] - 1, x_s)
        else:
            counts["rejected"] += 1
        h = theta * h * max(err, 1e-10) ** (-1.0 / order)
    if denoise_final:
        x_s = evaluate(x_s, s).x0
    return AdaptiveResult(x=x_s, **counts)
