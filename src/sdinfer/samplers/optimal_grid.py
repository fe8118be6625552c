"""Optimal time grids by dynamic programming on teacher trajectories: GITS (Chen, Zhou, Wang,
Zhao & Tao, "On the Trajectory Regularity of ODE-based Diffusion Sampling", ICML 2024),
Algorithm 1.

1. Teacher: a few trajectories of the probability-flow ODE solved accurately (``reference.py``:
   fourth-order Runge-Kutta in lambda, checked by step doubling) through a fine grid
   t_0 = 1 > t_1 > ... > t_{M-1} = t_min and the clean end t_M = 0, with the model's data
   prediction x0_i at each fine node x_i.
2. Cost: c(i, j) = RMS distance between one first-order (DDIM) step from the teacher's x_i to
   t_j, alpha_j x0_i + sigma_j eps_i, and the teacher's x_j: that step's local error.
3. Dynamic programming: of the paths 0 = i_0 < i_1 < ... < i_K = M with K steps, the one that
   minimises sum_k c(i_{k-1}, i_k); the model is evaluated at t_{i_0}, ..., t_{i_{K-1}}.

The cost matrix is what is saved (safetensors, beside the model as its ``gits`` artifact, ``models/artifacts.py``),
so ``times(steps)`` solves the program for any step count.  The grid is found with the
first-order step and used with any sampler, as the paper does with DDIM, iPNDM and DPM-Solver-2.
The path may jump to clean data from any node, so no evaluation is spent at t_min.  On the
exact mixture (``bench/results/error_vs_nfe_gm.md``) it has 0.4-0.8 of the error of each
solver's best fixed grid at NFE 6-20 for DDIM, DPM-Solver++(2M), UniPC-2 and DPM-Solver-v3;
it does not suit PLMS (whose formula assumes equal steps), Heun (its last step, to clean
data, is an Euler step) or the noise-prediction singlestep DPM-Solver-3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models import artifacts

KIND = "sdinfer-gits"


@dataclass(eq=False)
class OptimalGrid:
    """Fine-grid times (descending, ending at 0) and the step cost between every two of them."""

    nodes: torch.Tensor          # (M + 1,) continuous times, nodes[0] = 1, nodes[-1] = 0
    cost: torch.Tensor           # (M + 1, M + 1); cost[i, j] for i < j, inf elsewhere
    meta: dict = field(default_factory=dict)
    name: str = "gits"

    def __post_init__(self) -> None:
        n = self.nodes.shape[0]
        if self.nodes.ndim != 1 or n < 2 or self.cost.shape != (n, n):
            raise ValueError(f"a gits grid needs nodes (M+1,) and a cost (M+1, M+1); got "
                             f"{tuple(self.nodes.shape)} and {tuple(self.cost.shape)}")
        if not bool((self.nodes[1:] < self.nodes[:-1]).all()) or float(self.nodes[-1]) != 0.0:
            raise ValueError("gits grid nodes must decrease strictly and end at t = 0")
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        if not bool(torch.isfinite(self.cost[upper]).all()) or bool((self.cost[upper] < 0).any()):
            raise ValueError("gits grid costs must be finite and >= 0 above the diagonal")
        self.cost = torch.where(upper, self.cost.double(), torch.full_like(self.cost.double(), float("inf")))
        self.nodes = self.nodes.double()

    @property
    def max_steps(self) -> int:
        return self.nodes.shape[0] - 1

    def path(self, steps: int) -> list[int]:
        """Node indices i_0 = 0 < ... < i_steps = M of the cheapest ``steps``-step path."""
        if not 1 <= steps <= self.max_steps:
            raise ValueError(f"this gits grid has {self.max_steps + 1} nodes, so 1 to {self.max_steps} "
                             f"steps; got {steps} (calibrate with more --points for more steps)")
        n = self.nodes.shape[0]
        best = torch.full((n,), float("inf"), dtype=torch.float64)
        best[0] = 0.0
        back = []
        for _ in range(steps):
            total = best[:, None] + self.cost          # total[i, j]: reach i, then step i -> j
            best, arg = total.min(dim=0)
            back.append(arg)
        nodes = [n - 1]
        for arg in reversed(back):
            nodes.append(int(arg[nodes[-1]]))
        return nodes[::-1]

    def times(self, steps: int) -> list[float]:
        """``steps + 1`` continuous times from t = 1 to 0: the grid ``sample_loop`` runs on."""
        return [float(self.nodes[i]) for i in self.path(steps)]

    def save(self, path: str | Path) -> None:
        finite = torch.where(torch.isfinite(self.cost), self.cost, torch.zeros_like(self.cost))
        artifacts.write(path, {"nodes": self.nodes, "cost": finite}, {"kind": KIND, "meta": self.meta})

    @classmethod
    def load(cls, path: str | Path) -> "OptimalGrid":
        tensors, meta = artifacts.read(path, "gits grid", "sdinfer calibrate --method gits", json_keys=("meta",))
        if meta.get("kind") != KIND or set(tensors) != {"nodes", "cost"}:
            raise ValueError(f"{path} is not a gits grid (made by `sdinfer calibrate --method gits`)")
        return cls(tensors["nodes"], tensors["cost"], meta.get("meta", {}))


def fine_nodes(schedule, points: int) -> torch.Tensor:
    """The fine grid: ``points`` times uniform in t and ``points`` uniform in log-SNR, from
    t = 1 to t_min (so both the high-noise and the low-noise ends are finely resolved), and 0."""
    from .base import continuous_times

    ts = torch.tensor(continuous_times(schedule, points, "time_uniform")
                      + continuous_times(schedule, points, "logsnr"), dtype=torch.float64)
    ts = torch.unique(ts.round(decimals=12)).flip(0)
    return torch.cat([ts, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def compute_grid(denoiser, x_T: torch.Tensor, cond, uncond, points: int = 60, tolerance: float | None = None,
                 meta: dict | None = None) -> OptimalGrid:
    """Teacher trajectories from ``x_T`` (to ``tolerance``, by default the reference's) and the
    cost of each first-order step between fine nodes."""
    from ..context import StepContext
    from .reference import TOLERANCE, solve_reference

    if points < 2:
        raise ValueError(f"gits needs points >= 2, got {points}")
    sched = denoiser.schedule
    if sched.is_flow:
        raise ValueError("gits grids are made for VP schedules; a flow-matching model uses the flow grid")
    nodes = fine_nodes(sched, points)
    teacher = solve_reference(denoiser, x_T, cond, uncond, times=nodes.tolist(),
                              tolerance=TOLERANCE if tolerance is None else tolerance)
    xs = teacher.states
    x0s = []
    for i, t in enumerate(nodes[:-1].tolist()):
        ctx = StepContext(step_index=i, num_steps=len(nodes) - 1, t=t,
                          model_t=float(sched.model_time(t)))
        x0s.append(denoiser(xs[i], t, cond, uncond, ctx).x0)
    n = nodes.shape[0]
    cost = torch.full((n, n), float("inf"), dtype=torch.float64)
    for i in range(n - 1):
        a_i, s_i = float(sched.alpha(nodes[i])), float(sched.sigma(nodes[i]))
        eps = (xs[i] - a_i * x0s[i]) / s_i
        for j in range(i + 1, n):
            if j == n - 1:
                guess = x0s[i]
            else:
                guess = float(sched.alpha(nodes[j])) * x0s[i] + float(sched.sigma(nodes[j])) * eps
            cost[i, j] = float((guess - xs[j]).double().square().mean().sqrt())
    return OptimalGrid(nodes, cost, {**(meta or {}), "points": points, "samples": int(x_T.shape[0]),
                                     "teacher": f"RK4 in lambda, {teacher.steps} steps (step doubling: "
                                                f"{teacher.difference:.2g} RMS)"})
