"""DPM-Solver and DPM-Solver++, multistep, orders 1-3, and SDE-DPM-Solver++.

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

with D0 = m_0, D1 ~ h m' and D2 ~ h^2 m'' the divided differences of the history
(r_k = h_k / h).  The exact integral of the second-order Taylor term,
alpha_t int_0^h e^{-(h-u)} u^2/2 du m'' = -alpha_t ((e^{-h} - 1 + h)/h^2 - 1/2) h^2 m'',
needs D2 ~ h^2 m''.  The reference code and diffusers' third-order multistep use
(D1_0 - D1_1) / (r0 + r1) ~ h^2 m'' / 2, half of it, which leaves them second order
(measured on the Gaussian mixture: 2.1 instead of 3; tests/test_convergence.py);
we use twice that, and ``match_diffusers=True`` restores their update bit for bit.
Order 1 of either is DDIM.  The first steps and, with ``lower_order_final``,
the last steps of short schedules use lower orders; the step to t = 0 returns
the data prediction (first order at sigma = 0), as diffusers does.

``sde=True`` (DPM-Solver++ only) is SDE-DPM-Solver++(2M) of the same paper
(sec. 5): the same expansion of the data prediction for the reverse SDE, whose
exact linear part gives e^{-2h}-weights and fresh Gaussian noise per step
(``exponential_update`` writes the three forms).  The singlestep solvers and
the adaptive DPM-Solver-12/23 (``dpm_solver_singlestep``) use the same update.
"""

from __future__ import annotations

from dataclasses import dataclass


from ..devices import draw_noise
from .base import StepSampler
from .exponential_integrator import exponential_update

ALGORITHMS = ("dpmsolver++", "dpmsolver")


def check_order_and_algorithm(name: str, order, algorithm: str) -> int:
    order = int(order)
    if order not in (1, 2, 3):
        raise ValueError(f"{name} has orders 1, 2 and 3, not {order}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown DPM-Solver algorithm {algorithm!r}; "
                         f"choose one of {', '.join(ALGORITHMS)}")
    return order


@dataclass
class DPMSolverMultistep(StepSampler):
    order: int = 2
    algorithm: str = "dpmsolver++"
    lower_order_final: bool = True
    sde: bool = False
    match_diffusers: bool = False
    name: str = "dpm-solver++"
    min_steps: int = 1

    def __post_init__(self) -> None:
        self.order = check_order_and_algorithm(self.name, self.order, self.algorithm)
        if self.sde and self.algorithm != "dpmsolver++":
            raise ValueError("the SDE variant exists for dpm-solver++ only; use dpm-solver++:sde=true")

    def _step_order(self, state, available: int) -> int:
        short = state.num_steps < 15 and self.lower_order_final
        order = min(self.order, available)
        if state.step_index == state.num_steps - 1 and short:
            order = 1
        elif state.step_index == state.num_steps - 2 and short:
            order = min(order, 2)
        return order

    def step(self, model, x, t, t_next, state):
        pred = model(x, t)
        sched = model.schedule
        data = self.algorithm == "dpmsolver++"
        history = state.setdefault("history", [])
        history.insert(0, (float(sched.lam(t)), pred.x0 if data else pred.eps))
        del history[self.order:]
        if t_next == 0.0:
            return pred.x0
        order = self._step_order(state, len(history))
        lam_t = float(sched.lam(t_next))
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
                d2 = (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 m'' / 2
                if not self.match_diffusers:
                    d2 = 2.0 * d2
        noise = None
        if self.sde:
            noise = draw_noise(x.shape, state.generator, x)
        return exponential_update(sched, x, t, t_next, h, m0, d1, d2, data=data,
                                  midpoint=order == 2, noise=noise)
