"""PLMS: pseudo linear multistep (Liu et al., "Pseudo Numerical Methods for Diffusion
Models on Manifolds", ICLR 2022), as used by Stable Diffusion.

The transfer phi(x_t, eps, t -> s) of Eq. (9) is the DDIM update
x_s = alpha_s x0(x_t, eps) + sigma_s eps.  Eq. (12) combines the noise
predictions of the last four steps with Adams-Bashforth weights,

    eps' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24,       x_s = phi(x_t, eps', t -> s),

with the lower-order weights (3, -1)/2 and (23, -16, 5)/12 while the history
fills.  The first step is a pseudo improved-Euler step (two evaluations:
eps' = (e(x_t, t) + e(phi(x_t, e, t -> s), s)) / 2), as in diffusers'
PNDMScheduler with ``skip_prk_steps``.  The combination is over noise
predictions whatever the model predicts (diffusers combines a v model's raw
outputs instead, so the two agree on epsilon models only).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import StepSampler

WEIGHTS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12),
           4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def transfer(sched, x, eps, t: float, s: float):
    """phi: move x from t to s along the DDIM path given a noise prediction."""
    a_t, s_t = float(sched.alpha(t)), float(sched.sigma(t))
    a_s, s_s = float(sched.alpha(s)), float(sched.sigma(s))
    return a_s * (x - s_t * eps) / a_t + s_s * eps


@dataclass
class PLMS(StepSampler):
    name: str = "plms"
    min_steps: int = 1
    spacing: str = "leading"

    def step(self, model, x, t, t_next, state):
        sched = model.schedule
        eps = model(x, t).eps
        history = state.setdefault("eps", [])
        if not history:
            history.insert(0, eps)
            x_euler = transfer(sched, x, eps, t, t_next)
            eps_next = model(x_euler, t_next).eps
            return transfer(sched, x, 0.5 * (eps + eps_next), t, t_next)
        history.insert(0, eps)
        del history[4:]
        combined = sum(w * e for w, e in zip(WEIGHTS[len(history)], history))
        return transfer(sched, x, combined, t, t_next)
