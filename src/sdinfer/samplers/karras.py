"""Euler and Heun on the Karras grid (Karras et al., "Elucidating the Design Space of
Diffusion-Based Generative Models", NeurIPS 2022, Algorithm 1 with S_churn = 0).

Written in the variance-exploding variable of the VP process, x_hat = x / alpha_t
with noise level s_t = sigma_t / alpha_t = exp(-lambda_t), where the probability
flow ODE is dx_hat/ds = (x_hat - x0_hat) / s:

    Euler:  x_hat' = x_hat + d (s_next - s),          d = (x_hat - x0_hat(x_hat, s)) / s = eps_hat
    Heun:   d' = (x_hat' - x0_hat(x_hat', s_next)) / s_next,
            x_hat_next = x_hat + (d + d') / 2 (s_next - s)   (Euler on the step to s = 0)

The default grid is Karras' rho = 7 spacing of s between the schedule's ends.
On a flow-matching schedule (x = (1 - t) x0 + t eps) the same ODE is stepped in
x with the velocity v = eps - x0: x' = x + (t_next - t) v (diffusers'
FlowMatchEuler / FlowMatchHeun).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import StepSampler


def _ve_noise(sched, t: float) -> float:
    return math.exp(-float(sched.lam(t))) if t > 0 else 0.0


def _ode_frame(sched, t: float) -> tuple[float, float]:
    """(scale, tau): the ODE is stepped in y = scale * x against tau, where dy/dtau is
    eps (VP: y = x / alpha, tau = sigma / alpha) or eps - x0 (flow: y = x, tau = t)."""
    if sched.is_flow:
        return 1.0, t
    return 1.0 / float(sched.alpha(t)), _ve_noise(sched, t)


def _slope(sched, pred):
    return pred.eps - pred.x0 if sched.is_flow else pred.eps


@dataclass
class Euler(StepSampler):
    name: str = "euler"
    min_steps: int = 1
    spacing: str = "karras"

    def step(self, model, x, t, t_next, state):
        sched = model.schedule
        (c, tau), (c_n, tau_n) = _ode_frame(sched, t), _ode_frame(sched, t_next)
        d = _slope(sched, model(x, t))
        return (c * x + (tau_n - tau) * d) / c_n


@dataclass
class Heun(StepSampler):
    name: str = "heun"
    min_steps: int = 1
    spacing: str = "karras"

    def step(self, model, x, t, t_next, state):
        sched = model.schedule
        (c, tau), (c_n, tau_n) = _ode_frame(sched, t), _ode_frame(sched, t_next)
        d = _slope(sched, model(x, t))
        x_euler = (c * x + (tau_n - tau) * d) / c_n
        if tau_n == 0.0:
            return x_euler
        d2 = _slope(sched, model(x_euler, t_next))
        return (c * x + (tau_n - tau) * 0.5 * (d + d2)) / c_n
