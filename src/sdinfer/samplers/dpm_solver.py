"""DPM-Solver and DPM-Solver++, multistep, orders 1-3.

DPM-Solver (Lu et al., NeurIPS 2022) solves the diffusion ODE exactly in its
linear part and Taylor-expands the noise prediction in the half log-SNR
lambda; DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) does the same with the
data prediction, which stays stable under large guidance.  With
h = lambda_t - lambda_s and the model outputs m_0, m_1, m_2 at the last steps:

  DPM-Solver++ (Eq. 8 and Alg. 2; third order from the reference code):
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D0
          - 1/2 alpha_t (e^{-h} - 1) D1                                  (order 2)
        = ... + alpha_t ((e^{-h} - 1)/h + 1) D1
          - alpha_t ((e^{-h} - 1 + h)/h^2 - 1/2) D2                      (order 3)
  DPM-Solver (noise prediction, Eq. 3.7 / App. B multistep form):
    x_t = (alpha_t / alpha_s) x_s - sigma_t (e^{h} - 1) D0
          - 1/2 sigma_t (e^{h} - 1) D1                                   (order 2)
        = ... - sigma_t ((e^{h} - 1)/h - 1) D1
          - sigma_t ((e^{h} - 1 - h)/h^2 - 1/2) D2                       (order 3)

with D0 = m_0, D1 and D2 the divided differences of the history (r_k = h_k / h).
Order 1 of either is DDIM.  The first steps and, with ``lower_order_final``,
the last steps of short schedules use lower orders; the step to t = 0 returns
the data prediction (first order at sigma = 0), as diffusers does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALGORITHMS = ("dpmsolver++", "dpmsolver")


@dataclass
class DPMSolverMultistep:
    order: int = 2
    algorithm: str = "dpmsolver++"
    lower_order_final: bool = True
    name: str = "dpm-solver++"
    min_steps: int = 1

    def __post_init__(self) -> None:
        self.order = int(self.order)
        if self.order not in (1, 2, 3):
            raise ValueError(f"{self.name} has orders 1, 2 and 3, not {self.order}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown DPM-Solver algorithm {self.algorithm!r}; "
                             f"choose one of {', '.join(ALGORITHMS)}")

    def _step_order(self, ctx, available: int) -> int:
        short = ctx.num_steps < 15 and self.lower_order_final
        order = min(self.order, available)
        if ctx.step_index == ctx.num_steps - 1 and short:
            order = 1
        elif ctx.step_index == ctx.num_steps - 2 and short:
            order = min(order, 2)
        return order

    def step(self, denoiser, x, t, t_next, state, ctx, cond, uncond, generator):
        pred = denoiser(x, t, cond, uncond, ctx)
        sched = denoiser.schedule
        data = self.algorithm == "dpmsolver++"
        history = state.setdefault("history", [])
        history.insert(0, (float(sched.lam(t)), pred.x0 if data else pred.eps))
        del history[self.order:]
        if t_next == 0.0:
            return pred.x0
        order = self._step_order(ctx, len(history))
        lam_t = float(sched.lam(t_next))
        a_t, s_t = float(sched.alpha(t_next)), float(sched.sigma(t_next))
        a_s, s_s = float(sched.alpha(t)), float(sched.sigma(t))
        lam_s, m0 = history[0]
        h = lam_t - lam_s
        d1 = d2 = None
        if order >= 2:
            lam_1, m1 = history[1]
            r0 = (lam_s - lam_1) / h
            d1_0 = (m0 - m1) / r0
            d1 = d1_0
            if order == 3:
                lam_2, m2 = history[2]
                r1 = (lam_1 - lam_2) / h
                d1_1 = (m1 - m2) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
        if data:
            phi = math.expm1(-h)
            x_next = (s_t / s_s) * x - a_t * phi * m0
            if order == 2:
                x_next = x_next - 0.5 * a_t * phi * d1
            elif order == 3:
                x_next = x_next + a_t * (phi / h + 1.0) * d1 - a_t * ((phi + h) / h**2 - 0.5) * d2
        else:
            phi = math.expm1(h)
            x_next = (a_t / a_s) * x - s_t * phi * m0
            if order == 2:
                x_next = x_next - 0.5 * s_t * phi * d1
            elif order == 3:
                x_next = x_next - s_t * (phi / h - 1.0) * d1 - s_t * ((phi - h) / h**2 - 0.5) * d2
        return x_next
