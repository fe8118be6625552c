"""DPM-Solver-v3 (Zheng, Lu, Bao & Zhu, "DPM-Solver-v3: Improved Diffusion ODE Solver with
Empirical Model Statistics", NeurIPS 2023): Algorithm 1, the multistep predictor with the
UniPC-style corrector, on the model's empirical statistics (``ems.EMS``).

Each step evaluates the model once at x_s.  The corrector (if any) first re-solves the last
step from x_{s-1} to x_s with the fresh output included, one order higher, and keeps the
output's x-independent part sigma eps - l x fixed (the model is not called again); the
predictor then goes from x_s to x_t with the last ``order`` outputs:

    x_t = (alpha_t / alpha_s) e^{-L_t} x_s - alpha_t e^{-L_t} (I_t g_s + C_t + sum_n H_n g^(n)),

with g = e^{-S} f - B, f = (sigma eps - l x) / alpha (``ems`` gives the integrals).  The
derivatives g^(n) at s solve the Taylor system through the other outputs, or, "pseudo", are
the divided differences times n! (the paper's pseudo-order, for 5-10 steps).  The step to
t = 0 returns the data prediction of the (corrected) last point.  With l = 1, s = b = 0
(``degenerated=true``) the predictor is DPM-Solver++ with exact phi-functions.

``use_corrector``: true, false, or "half" (the reference code's ``half``: correct only the
points above t = 0.5, where the trajectory picks its image, and not the low-noise ones).
Default: order 1, and the corrector mode the statistics file says for the step count
(``corrector_by_steps`` in its metadata, which ``sdinfer calibrate`` chooses by the error on
validation trajectories; on if the file does not say); at the step counts where that
validation found DPM-Solver++(2M) better than every corrector mode (``variant_by_steps``),
DPM-Solver++(2M) steps instead (``variant=v3`` or any explicit setting keeps v3), so the
default runs what won on validation.  On the default models at NFE 5-10 with guidance 4
order 1 beat orders 2 and 3 (bench/results/dpm_solver_v3-*.md), and which
corrector mode pays changes with the model and the step count.  The paper uses order 2 for
guided sampling.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .base import StepSampler
from .dpm_solver import DPMSolverMultistep
from .ems import EMS


CORRECTOR_MODES = ("on", "half", "off")
VARIANTS = ("v3", "dpm-solver++")   # what the default solver runs at a step count
INTEGRAL_CACHE_BYTES = 64 * 2**20   # per solver
HALF_CORRECTOR_T = 0.5  # "half": correct only the points above this time (the reference code's ``half``)


def corrector_mode(value) -> str:
    """``on``, ``half`` or ``off`` from a setting (booleans mean on / off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    mode = str(value).lower()
    if mode == "true" or mode == "false":
        return "on" if mode == "true" else "off"
    if mode not in CORRECTOR_MODES:
        raise ValueError(f"dpm-solver-v3's use_corrector is one of true, false, half; not {value!r}")
    return mode


def _nearest(by_steps: dict, steps: int):
    return by_steps[min(by_steps, key=lambda n: (abs(int(n) - steps), -int(n)))]


def variant_setting(meta: dict, steps: int) -> str:
    """The statistics file's choice between v3 and DPM-Solver++(2M) for ``steps`` steps
    (``variant_by_steps``, at that step count or the nearest validated one); v3 if it says none."""
    by_steps = meta.get("variant_by_steps")
    if not by_steps:
        return "v3"
    variant = str(_nearest(by_steps, steps))
    if variant not in VARIANTS:
        raise ValueError(f"dpm-solver-v3 statistics name an unknown variant {variant!r}; "
                         f"choose again with `sdinfer calibrate --validate-only`")
    return variant


def corrector_setting(meta: dict, steps: int) -> str:
    """The statistics file's corrector choice for ``steps`` steps (``on``, ``half`` or ``off``):
    its choice at that step count, or at the nearest validated one; a file without choices
    keeps the corrector on."""
    by_steps = meta.get("corrector_by_steps")
    if not by_steps:
        return corrector_mode(meta.get("use_corrector", True))
    return corrector_mode(_nearest(by_steps, steps))


@dataclass
class _Point:
    lam: float
    x: torch.Tensor
    eps: torch.Tensor
    alpha: float
    sigma: float


@dataclass
class DPMSolverV3(StepSampler):
    stats: str | EMS | None = None
    order: int = 1
    use_corrector: bool | str | None = None   # True, False, "half"; None: as the statistics say
    p_pseudo: bool = False
    c_pseudo: bool = True
    lower_order_final: bool = True
    degenerated: bool = False
    variant: str | None = None   # "v3" or "dpm-solver++"; None: as the statistics' validation says
    name: str = "dpm-solver-v3"
    min_steps: int = 1
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _cache_bytes: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.order = int(self.order)
        if self.order not in (1, 2, 3):
            raise ValueError(f"{self.name} has orders 1, 2 and 3, not {self.order}")
        if self.use_corrector is not None:
            self.use_corrector = corrector_mode(self.use_corrector)
        if self.variant is not None and self.variant not in VARIANTS:
            raise ValueError(f"dpm-solver-v3's variant is one of {', '.join(VARIANTS)}; not {self.variant!r}")
        if isinstance(self.stats, (str, Path)):
            try:
                self.stats = EMS.load(self.stats)
            except FileNotFoundError as err:
                raise ValueError(str(err)) from None

    def statistics(self, schedule, like: torch.Tensor) -> EMS:
        if self.degenerated:
            if not isinstance(self.stats, EMS) or not self.stats.meta.get("degenerate"):
                lo, hi = float(schedule.lam(1.0)), float(schedule.lam(schedule.t_min))
                self.stats = EMS.degenerate(lo - 1.0, hi + 1.0, shape=(1,) * (like.ndim - 1))
            return self.stats
        if self.stats is None:
            raise ValueError("dpm-solver-v3 needs the model's statistics: pass stats=PATH, use a "
                             "model that ships them for this guidance scale, or make them with "
                             "`sdinfer calibrate`")
        try:
            torch.broadcast_shapes(self.stats.shape, like.shape[1:])
        except RuntimeError:
            raise ValueError(f"DPM-Solver-v3 statistics of shape {self.stats.shape} do not fit samples "
                             f"of shape {tuple(like.shape[1:])}; calibrate them on this model") from None
        return self.stats

    def runs_variant(self, ems: EMS, steps: int) -> str:
        """``v3``, or ``dpm-solver++`` where this solver runs DPM-Solver++(2M) instead: when told
        so, or, with the settings validation measured (order 1, the corrector as the file says,
        statistics), where the file's validation found DPM-Solver++ better at this step count."""
        if self.variant is not None:
            return self.variant
        if self.order != 1 or self.use_corrector is not None or self.degenerated:
            return "v3"
        return variant_setting(ems.meta, steps)

    def step(self, model, x, t, t_next, state):
        sched = model.schedule
        ems = self.statistics(sched, x)
        if self.runs_variant(ems, state.num_steps) == "dpm-solver++":
            return _PLUS_PLUS.step(model, x, t, t_next, state.child("dpm-solver++", state.step_index,
                                                                    state.num_steps))
        pred = model(x, t)
        hist: list[_Point] = state.setdefault("history", [])
        hist.insert(0, _Point(float(sched.lam(t)), x, pred.eps, float(sched.alpha(t)), float(sched.sigma(t))))
        del hist[self.order + 1:]
        c_order = state.get("p_order", 0) + (1 if self.c_pseudo else 0)
        mode = self.use_corrector or corrector_setting(ems.meta, state.num_steps)
        if (mode == "on" or (mode == "half" and t > HALF_CORRECTOR_T)) and len(hist) >= 2 and c_order > 1:
            now, before = hist[0], hist[1]
            others = [now, *hist[2:]][:c_order - 1]
            corrected = self._update(ems, before, now.lam, now.alpha, others, self.c_pseudo)
            l_now = self._integrals(ems, before.lam, now.lam, others).l_at[1].to(x)
            fixed = now.sigma * now.eps - l_now * now.x
            now.x, now.eps = corrected, (fixed + l_now * corrected) / now.sigma
        if t_next == 0.0:
            now = hist[0]
            return (now.x - now.sigma * now.eps) / now.alpha
        p_order = min(self.order, len(hist))
        if self.lower_order_final:
            p_order = min(p_order, state.num_steps - state.step_index)
        state["p_order"] = p_order
        return self._update(ems, hist[0], float(sched.lam(t_next)), float(sched.alpha(t_next)),
                            hist[1:p_order], self.p_pseudo)

    def _integrals(self, ems: EMS, lam_s: float, lam_t: float, others: list[_Point]):
        """The step's integrals, kept in a least-recently-used cache of at most
        ``INTEGRAL_CACHE_BYTES`` (a step count's steps recur in every generation)."""
        key = (id(ems), lam_s, lam_t, tuple(o.lam for o in others))
        cache: OrderedDict = self._cache
        if key in cache:
            cache.move_to_end(key)
            return cache[key][0]
        ints = ems.integrals(lam_s, lam_t, list(key[3]), len(others) + 1)
        size = ints.nbytes()
        cache[key] = (ints, size, ems)   # the statistics kept alive while id(ems) is a key
        self._cache_bytes += size
        while self._cache_bytes > INTEGRAL_CACHE_BYTES and len(cache) > 1:
            _, (_, dropped, _) = cache.popitem(last=False)
            self._cache_bytes -= dropped
        return ints

    def _update(self, ems: EMS, s: _Point, lam_t: float, alpha_t: float, others: list[_Point],
                pseudo: bool) -> torch.Tensor:
        ints = self._integrals(ems, s.lam, lam_t, others)
        dt = s.x   # .to(dt): the statistics on the sample's device, in its dtype

        def f(p: _Point, l: torch.Tensor) -> torch.Tensor:
            return (p.sigma * p.eps - l.to(dt) * p.x) / p.alpha

        g_s = f(s, ints.l_at[0])
        gs = [torch.exp(-S).to(dt) * f(p, l) - B.to(dt)
              for p, S, B, l in zip(others, ints.S_at, ints.B_at, ints.l_at[2:])]
        decay = torch.exp(-ints.L_t).to(dt)
        x_t = (alpha_t / s.alpha) * decay * s.x - alpha_t * decay * (ints.I_t.to(dt) * g_s + ints.C_t.to(dt))
        if others:
            derivs = _derivatives([s.lam] + [p.lam for p in others], [g_s, *gs], pseudo)
            for H, d in zip(ints.H, derivs):
                x_t = x_t - alpha_t * decay * H.to(dt) * d
        return x_t


_PLUS_PLUS = DPMSolverMultistep(order=2)


def _derivatives(lams: list[float], gs: list[torch.Tensor], pseudo: bool) -> list[torch.Tensor]:
    """g', g'', ... at lams[0] from the values at all points: the Taylor system, or (pseudo)
    the divided differences times n!."""
    n = len(lams) - 1
    if pseudo:
        table = [list(gs)]
        for i in range(1, n + 1):
            prev = table[-1]
            table.append([(prev[j] - prev[j + 1]) / (lams[j] - lams[i + j]) for j in range(n - i + 1)])
        return [table[i][0] * math.factorial(i) for i in range(1, n + 1)]
    offsets = torch.tensor([lam - lams[0] for lam in lams[1:]], dtype=torch.float64)
    system = torch.stack([offsets**k for k in range(1, n + 1)], dim=1)          # (n, n)
    inverse = torch.linalg.inv(system).to(gs[0])
    diffs = [g - gs[0] for g in gs[1:]]
    return [sum(inverse[k, i] * diffs[i] for i in range(n)) * math.factorial(k + 1) for k in range(n)]
