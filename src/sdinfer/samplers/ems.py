"""Empirical model statistics (EMS) of DPM-Solver-v3 (Zheng et al., NeurIPS 2023, Sec. 3):
the coefficients l, s, b over the half log-SNR lambda, their integrals, and their file.

With the noise prediction eps and lambda = log(alpha / sigma), DPM-Solver-v3 writes the
diffusion ODE through

    f(x, lambda) = (sigma eps - l x) / alpha,       g = e^{-S} f - B,
    L = int l,  S = int s,  B = int e^{-S} b,  I = int e^{L+S},  C = int e^{L+S} B,

(integrals in lambda from the step's start s), and its exact solution from s to t is
(Eq. 9 and 11 with the origin at s)

    x_t = (alpha_t / alpha_s) e^{-L_t} x_s
          - alpha_t e^{-L_t} [ I_t g_s + C_t + sum_n H_n,t g^(n)_s ],
    H_n,t = int_s^t e^{L+S} (lambda - lambda_s)^n / n!  d lambda,

where g^(n) are the lambda-derivatives of g, estimated from earlier model outputs.
l, s, b are chosen from data (``sdinfer calibrate``): l minimises the x-dependence of
sigma eps - l x (l = E tr(d sigma eps / dx) / D), and s, b make f' ~ s f + b in least
squares along sampling trajectories, so that g is as close to constant as the data allow.
l = 1, s = b = 0 gives DPM-Solver++.  Statistics are stored on a lambda grid; between its
points they are linear, and the integrals use the trapezoid rule on that grid refined to
a spacing of at most ``MAX_NODE_SPACING`` in lambda (relative error ~ 2e-6 on e^lambda).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models import artifacts

MAX_NODE_SPACING = 0.005
COEFFICIENTS = ("l", "s", "b")


@dataclass
class StepIntegrals:
    """Integrals for one step from lambda_s, each of the statistics' shape (own storage)."""
    L_t: torch.Tensor
    I_t: torch.Tensor
    C_t: torch.Tensor
    H: list[torch.Tensor]                 # H_1,t ... H_{order-1},t
    S_at: list[torch.Tensor]              # S and B at the history points (relative to s)
    B_at: list[torch.Tensor]
    l_at: list[torch.Tensor]              # l at the history points and at t

    def nbytes(self) -> int:
        """The bytes of the tensors' storage."""
        tensors = [self.L_t, self.I_t, self.C_t, *self.H, *self.S_at, *self.B_at, *self.l_at]
        return sum(t.untyped_storage().nbytes() for t in tensors)


@dataclass
class EMS:
    lam: torch.Tensor                     # (K + 1,), increasing
    l: torch.Tensor                       # (K + 1, *shape), shape broadcastable to a sample
    s: torch.Tensor
    b: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lam = self.lam.to(torch.float64)
        for name in COEFFICIENTS:
            value = getattr(self, name).to(torch.float64)
            if value.shape[0] != self.lam.shape[0]:
                raise ValueError(f"EMS {name} has {value.shape[0]} rows for {self.lam.shape[0]} lambdas")
            setattr(self, name, value)
        if not bool((self.lam[1:] > self.lam[:-1]).all()):
            raise ValueError("EMS lambda grid must increase strictly")

    @classmethod
    def degenerate(cls, lam_min: float, lam_max: float, points: int = 101,
                   shape: tuple[int, ...] = (1, 1, 1)) -> "EMS":
        """l = 1, s = b = 0: DPM-Solver-v3 reduces to DPM-Solver++."""
        lam = torch.linspace(lam_min, lam_max, points, dtype=torch.float64)
        ones = torch.ones(points, *shape, dtype=torch.float64)
        return cls(lam, ones, torch.zeros_like(ones), torch.zeros_like(ones), {"degenerate": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.l.shape[1:])

    # ---- file --------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        return artifacts.write(path, {"lam": self.lam, "l": self.l, "s": self.s, "b": self.b},
                               {"sdinfer_ems": self.meta})

    @classmethod
    def load(cls, path: str | Path) -> "EMS":
        tensors, meta = artifacts.read(path, "DPM-Solver-v3 statistics", "sdinfer calibrate --model MODEL --cfg SCALE",
                                       json_keys=("sdinfer_ems",))
        missing = [k for k in ("lam", *COEFFICIENTS) if k not in tensors]
        if missing:
            raise ValueError(f"{path} is not a DPM-Solver-v3 statistics file (no {', '.join(missing)})")
        return cls(tensors["lam"], tensors["l"], tensors["s"], tensors["b"], meta.get("sdinfer_ems", {}))

    # ---- integrals ---------------------------------------------------------
    def _at(self, nodes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """l, s, b linearly interpolated at ``nodes`` (constant beyond the grid)."""
        lam = self.lam
        x = nodes.clamp(float(lam[0]), float(lam[-1]))
        hi = torch.searchsorted(lam, x).clamp(1, len(lam) - 1)
        lo = hi - 1
        w = ((x - lam[lo]) / (lam[hi] - lam[lo])).view(-1, *([1] * len(self.shape)))
        return tuple(v[lo] * (1 - w) + v[hi] * w for v in (self.l, self.s, self.b))

    def integrals(self, lam_s: float, lam_t: float, history: list[float], orders: int) -> StepIntegrals:
        """The integrals of one step from ``lam_s`` to ``lam_t``; ``history`` are the lambdas of
        the other model outputs used (earlier steps, or t for the corrector)."""
        points = [lam_s, lam_t, *history]
        lo, hi = min(points), max(points)
        inner = self.lam[(self.lam > lo) & (self.lam < hi)]
        knots = torch.unique(torch.cat([inner, torch.tensor(points, dtype=torch.float64)]))
        pieces = [torch.linspace(float(a), float(b), max(2, math.ceil((b - a) / MAX_NODE_SPACING) + 1),
                                 dtype=torch.float64)[:-1] for a, b in zip(knots[:-1], knots[1:])]
        nodes = torch.cat([*pieces, knots[-1:]])
        l, s, b = self._at(nodes)
        origin = int(torch.argmin((nodes - lam_s).abs()))

        def cumulative(values: torch.Tensor) -> torch.Tensor:
            dx = (nodes[1:] - nodes[:-1]).view(-1, *([1] * len(self.shape)))
            steps = 0.5 * dx * (values[1:] + values[:-1])
            total = torch.cat([torch.zeros_like(values[:1]), torch.cumsum(steps, 0)])
            return total - total[origin]

        L, S = cumulative(l), cumulative(s)
        B = cumulative(torch.exp(-S) * b)
        weight = torch.exp(L + S)
        index = {p: int(torch.argmin((nodes - p).abs())) for p in points}
        t = index[lam_t]
        rel = (nodes - lam_s).view(-1, *([1] * len(self.shape)))
        H = [cumulative(weight * rel**n / math.factorial(n))[t] for n in range(1, orders)]
        # copies, not views: a view keeps the whole (nodes, *shape) array of its integral alive
        return StepIntegrals(L_t=L[t].clone(), I_t=cumulative(weight)[t].clone(),
                             C_t=cumulative(weight * B)[t].clone(), H=[h.clone() for h in H],
                             S_at=[S[index[p]].clone() for p in history],
                             B_at=[B[index[p]].clone() for p in history],
                             l_at=[l[index[p]].clone() for p in (lam_s, lam_t, *history)])
