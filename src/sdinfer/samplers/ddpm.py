"""DDPM ancestral sampling (Ho, Jain & Abbeel, NeurIPS 2020).

Each step samples the posterior q(x_s | x_t, x0_hat) of Eq. (6)-(7), written
for any pair of steps t > s (not only neighbours) with abar = alpha^2:

    a      = abar_t / abar_s,  b = 1 - a
    mean   = sqrt(abar_s) b / (1 - abar_t) * x0_hat + sqrt(a) (1 - abar_s) / (1 - abar_t) * x_t
    var    = (1 - abar_s) / (1 - abar_t) * b          (beta-tilde, "fixed_small")
    x_s    = mean + sqrt(var) z
"""

from __future__ import annotations

from dataclasses import dataclass


from ..devices import draw_noise
from .base import StepSampler


@dataclass
class DDPM(StepSampler):
    name: str = "ddpm"
    min_steps: int = 1

    def step(self, model, x, t, t_next, state):
        pred = model(x, t)
        sched = model.schedule
        ab_t = float(sched.alpha(t)) ** 2
        ab_s = float(sched.alpha(t_next)) ** 2
        a = ab_t / ab_s
        b = 1.0 - a
        mean = (ab_s**0.5 * b / (1 - ab_t)) * pred.x0 + (a**0.5 * (1 - ab_s) / (1 - ab_t)) * x
        var = (1 - ab_s) / (1 - ab_t) * b
        if t_next == 0.0 or var <= 0:
            return mean
        noise = draw_noise(x.shape, state.generator, x)
        return mean + var**0.5 * noise
