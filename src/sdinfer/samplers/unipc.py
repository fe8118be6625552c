"""UniPC: unified predictor-corrector (Zhao et al., NeurIPS 2023), data prediction.

With h = lambda_t - lambda_s, hh = -h, B(h) = hh ("bh1") or e^{hh} - 1 ("bh2"),
the history m_s, m_{s_1}, ... and r_k = (lambda_{s_k} - lambda_s) / h:

  base      x_t' = (sigma_t / sigma_s) x_s - alpha_t (e^{hh} - 1) m_s
  UniP-p    x_t  = x_t' - alpha_t B(h) sum_k a_k D_k,      D_k = (m_{s_k} - m_s) / r_k
  UniC-p    x_t^c = x_t' - alpha_t B(h) (sum_k a^c_k D_k + a^c_p (m_t - m_s))

where the coefficients solve R a = b (Eq. 8 / Alg. 1-2 of the paper):
R_ik = r_k^{i-1}, b_i = i! phi_{i+1}(hh) / B(h), phi_1 = (e^{hh} - 1)/hh,
phi_{k+1} = (phi_k - 1/k!) / hh (with a = 1/2 when there is one unknown).
The corrector reuses the model output m_t evaluated at the predicted x_t, the
evaluation the next predictor needs anyway, so it raises the order at no extra
NFE; the corrected x_t starts the next step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import StepSampler


SOLVER_TYPES = ("bh1", "bh2")


@dataclass
class UniPC(StepSampler):
    order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    use_corrector: bool = True
    name: str = "unipc"
    min_steps: int = 1

    def __post_init__(self) -> None:
        self.order = int(self.order)
        if self.order not in (1, 2, 3):
            raise ValueError(f"unipc has orders 1, 2 and 3, not {self.order}")
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(f"unknown UniPC solver type {self.solver_type!r}; "
                             f"choose one of {', '.join(SOLVER_TYPES)}")

    def _coefficients(self, rks: list[float], h: float):
        """R and b of the linear system for ``len(rks)`` unknowns (the last r is 1)."""
        hh = -h
        b_h = hh if self.solver_type == "bh1" else math.expm1(hh)
        phi = math.expm1(hh) / hh - 1.0
        factorial = 1
        rows, b = [], []
        for i in range(1, len(rks) + 1):
            rows.append([r ** (i - 1) for r in rks])
            b.append(phi * factorial / b_h)
            factorial *= i + 1
            phi = phi / hh - 1.0 / factorial
        return rows, b, b_h

    def _update(self, sched, x, t_from, t_to, history, order, m_new=None):
        """Predictor (``m_new`` None) or corrector from ``t_from`` to ``t_to``."""
        lam_s, m_s = history[0]
        lam_t = float(sched.lam(t_to))
        h = lam_t - lam_s
        a_t, s_t = float(sched.alpha(t_to)), float(sched.sigma(t_to))
        s_s = float(sched.sigma(t_from))
        rks, diffs = [], []
        for lam_k, m_k in history[1:order]:
            r = (lam_k - lam_s) / h
            rks.append(r)
            diffs.append((m_k - m_s) / r)
        R, b, b_h = self._coefficients(rks + [1.0], h)
        x_t = (s_t / s_s) * x - a_t * math.expm1(-h) * m_s
        if m_new is None:
            if not diffs:
                return x_t
            rhos = [0.5] if len(diffs) == 1 else _solve([r[:-1] for r in R[:-1]], b[:-1])
            return x_t - a_t * b_h * sum(r * d for r, d in zip(rhos, diffs))
        rhos = [0.5] if order == 1 else _solve(R, b)
        res = sum(r * d for r, d in zip(rhos[:-1], diffs)) if diffs else 0.0
        return x_t - a_t * b_h * (res + rhos[-1] * (m_new - m_s))

    def step(self, model, x, t, t_next, state):
        pred = model(x, t)
        sched = model.schedule
        history = state.setdefault("history", [])
        if self.use_corrector and "last_x" in state:
            x = self._update(sched, state["last_x"], state["last_t"], t, history,
                             state["last_order"], m_new=pred.x0)
        history.insert(0, (float(sched.lam(t)), pred.x0))
        del history[self.order:]
        order = min(self.order, len(history))
        if self.lower_order_final:
            order = min(order, state.num_steps - state.step_index)
        state.update(last_x=x, last_t=t, last_order=order)
        if t_next == 0.0 and order == 1:
            return pred.x0
        return self._update(sched, x, t, t_next, history, order)


def _solve(rows: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for the <= 3 x 3 systems above (a torch
    solve per step costs more than the whole update)."""
    n = len(rhs)
    a = [list(row) + [v] for row, v in zip(rows, rhs)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            a[r] = [x - f * y for x, y in zip(a[r], a[col])]
    out = [0.0] * n
    for r in reversed(range(n)):
        out[r] = (a[r][n] - sum(a[r][c] * out[c] for c in range(r + 1, n))) / a[r][r]
    return out
