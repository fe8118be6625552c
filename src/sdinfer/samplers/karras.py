"""Euler and Heun on the Karras grid (Karras et al., "Elucidating the Design Space of
Diffusion-Based Generative Models", NeurIPS 2022, Algorithm 1 with S_churn = 0).

Written in the variance-exploding variable of the VP process, x_hat = x / alpha_t
with noise level s_t = sigma_t / alpha_t = exp(-lambda_t), where the probability
flow ODE is dx_hat/ds = (x_hat - x0_hat) / s:

    Euler:  x_hat' = x_hat + d (s_next - s),          d = (x_hat - x0_hat(x_hat, s)) / s
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


def _ve_noise(sched, t: float) -> float:
    return math.exp(-float(sched.lam(t))) if t > 0 else 0.0


def _velocity(pred):
    return pred.eps - pred.x0


@dataclass
class Euler:
    name: str = "euler"
    min_steps: int = 1
    spacing: str = "karras"

    def step(self, denoiser, x, t, t_next, state, ctx, cond, uncond, generator):
        sched = denoiser.schedule
        if sched.is_flow:
            return x + (t_next - t) * _velocity(denoiser(x, t, cond, uncond, ctx))
        a_t, a_n = float(sched.alpha(t)), float(sched.alpha(t_next))
        s, s_next = _ve_noise(sched, t), _ve_noise(sched, t_next)
        x_hat = x / a_t
        d = (x_hat - denoiser(x, t, cond, uncond, ctx).x0) / s
        return (x_hat + d * (s_next - s)) * a_n


@dataclass
class Heun:
    name: str = "heun"
    min_steps: int = 1
    spacing: str = "karras"

    def step(self, denoiser, x, t, t_next, state, ctx, cond, uncond, generator):
        sched = denoiser.schedule
        if sched.is_flow:
            v = _velocity(denoiser(x, t, cond, uncond, ctx))
            x_euler = x + (t_next - t) * v
            if t_next == 0.0:
                return x_euler
            v2 = _velocity(denoiser(x_euler, t_next, cond, uncond, ctx))
            return x + (t_next - t) * 0.5 * (v + v2)
        a_t, a_n = float(sched.alpha(t)), float(sched.alpha(t_next))
        s, s_next = _ve_noise(sched, t), _ve_noise(sched, t_next)
        x_hat = x / a_t
        d = (x_hat - denoiser(x, t, cond, uncond, ctx).x0) / s
        x_euler = x_hat + d * (s_next - s)
        if s_next == 0.0:
            return x_euler * a_n
        d2 = (x_euler - denoiser(x_euler * a_n, t_next, cond, uncond, ctx).x0) / s_next
        return (x_hat + 0.5 * (d + d2) * (s_next - s)) * a_n
