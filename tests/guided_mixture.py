"""A guided exact problem for the calibration tests: classifier-free guidance between the
Gaussian mixture of ``sdinfer.eval.gaussian_mixture`` (the unconditional model) and the same
mixture scaled by ``SCALE`` and shifted by ``SHIFT`` (the conditional one, whose posterior mean
is exact too: E[c x0 + d | alpha (c x0 + d) + sigma eps = x] = c E[x0 | (alpha c) x0 + sigma eps
= x - alpha d] + d), and the guided ODE's solution by scipy at tight tolerance."""

from __future__ import annotations

import numpy as np
import torch
from scipy.integrate import solve_ivp

from sdinfer.denoiser import Denoiser
from sdinfer.eval import gaussian_mixture as gm

SCALE = 0.7
SHIFT = torch.tensor([0.4, -0.3], dtype=torch.float64)


def x0_conditional(x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    a = torch.as_tensor(alpha, dtype=x.dtype).reshape(-1, 1)
    return SCALE * gm.x0_given(x - a * SHIFT, a * SCALE, sigma) + SHIFT


def x0_guided(x: torch.Tensor, alpha, sigma, w: float) -> torch.Tensor:
    """The guided data prediction; guidance 1 is the unconditional mixture (as ``problem``)."""
    u = gm.x0_given(x, alpha, sigma)
    if w == 1.0:
        return u
    return u + w * (x0_conditional(x, alpha, sigma) - u)


def model_fn(sched):
    """A 'sample' model on (B, 2, 1, 1): the conditional mixture where the text is 1, the
    unconditional where it is 0 (text: (B, 1); None is unconditional)."""
    def fn(x, model_t, text=None):
        t = sched.continuous_time(torch.as_tensor(model_t, dtype=torch.float64).reshape(-1))
        a, s = sched.alpha(t), sched.sigma(t)
        flat = x.view(x.shape[0], 2)
        out = gm.x0_given(flat, a, s)
        if text is not None:
            out = torch.where(text.view(-1, 1) > 0.5, x0_conditional(flat, a, s), out)
        return out.view_as(x)
    return fn


def problem(guidance: float, n: int, seed: int):
    """(denoiser, x_T, cond, uncond) of the guided mixture (guidance 1: the unguided one)."""
    sched = gm.schedule()
    x_T = torch.randn(n, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    if guidance == 1.0:
        return Denoiser(gm.model_fn(sched), sched, "sample"), x_T, None, None
    cond, uncond = torch.ones(n, 1, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64)
    return Denoiser(model_fn(sched), sched, "sample", guidance_scale=guidance), x_T, cond, uncond


def exact_states(guidance: float, x_T: torch.Tensor, times: list[float]) -> list[torch.Tensor]:
    """The guided probability-flow ODE solved by scipy from t = 1 through ``times`` (falling, each
    >= t_min): x at each."""
    sched = gm.schedule()
    lams = [float(sched.lam(t)) for t in times]

    def rhs(lam, y):
        t = sched.inverse_lambda(torch.tensor(lam, dtype=torch.float64))
        a, s = sched.alpha(t), sched.sigma(t)
        x = torch.from_numpy(y).view(-1, 2) * s
        return (np.exp(lam) * x0_guided(x, a, s, guidance)).numpy().ravel()

    y0 = (x_T.view(-1, 2) / sched.sigma(1.0)).numpy().ravel()
    sol = solve_ivp(rhs, (float(sched.lam(1.0)), lams[-1]), y0, method="DOP853", t_eval=lams,
                    rtol=1e-12, atol=1e-12)
    return [(torch.from_numpy(sol.y[:, k]).view(-1, 2) * sched.sigma(t)).view(x_T.shape)
            for k, t in enumerate(times)]


def exact(guidance: float, x_T: torch.Tensor, t_end: float | None = None) -> torch.Tensor:
    """The guided probability-flow ODE solved by scipy from t = 1 to t_end (default t_min),
    then the guided data prediction there: what every sampler's last step to t = 0 returns."""
    sched = gm.schedule()
    t_end = sched.t_min if t_end is None else t_end
    x = exact_states(guidance, x_T, [t_end])[0].view(-1, 2)
    return x0_guided(x, sched.alpha(t_end), sched.sigma(t_end), guidance).view(x_T.shape)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).square().mean().sqrt())
