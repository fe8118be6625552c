"""An exact model for testing samplers: a Gaussian mixture whose denoiser is analytic.

Data x0 ~ sum_k w_k N(mu_k, s_k^2 I).  Under x_t = alpha x0 + sigma eps the
noisy marginal is sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I) and

    E[x0 | x_t] = sum_k g_k(x_t) (mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x_t - alpha mu_k)),

with g_k the posterior weights.  ``reference_solution`` integrates the probability
flow ODE in lambda, d(x / sigma)/d lambda = e^lambda x0(x), with scipy at tight tolerance.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.integrate import solve_ivp

from sdinfer.schedules import NoiseSchedule

WEIGHTS = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)
MEANS = torch.tensor([[-1.0, 0.5], [0.8, -0.6], [0.2, 1.2]], dtype=torch.float64)
STDS = torch.tensor([0.3, 0.4, 0.25], dtype=torch.float64)


def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


def x0_given(x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Posterior mean of x0; x is (B, 2), alpha and sigma numbers or one per sample (B,)."""
    alpha = torch.as_tensor(alpha, dtype=x.dtype).reshape(-1, 1)   # (B or 1, 1)
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
    var = alpha**2 * STDS**2 + sigma**2                          # (B or 1, K)
    diff = x[:, None, :] - alpha[:, :, None] * MEANS[None]        # (B, K, 2)
    logp = torch.log(WEIGHTS) - diff.square().sum(-1) / (2 * var) - torch.log(var)  # d = 2
    g = torch.softmax(logp, dim=1)                                # (B, K)
    means = MEANS[None] + (alpha * STDS**2 / var)[:, :, None] * diff
    return (g[..., None] * means).sum(1)


def model_fn(sched: NoiseSchedule):
    """A 'sample'-prediction model in the schedule's model-time convention, on (B, 2, 1, 1);
    one model time per sample (parallel samplers evaluate several steps in one call)."""
    def fn(x, model_t, text=None):
        t = sched.continuous_time(torch.as_tensor(model_t, dtype=torch.float64).reshape(-1))
        a, s = sched.alpha(t), sched.sigma(t)
        return x0_given(x.view(x.shape[0], 2), a, s).view_as(x)
    return fn


def sample_data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
    return MEANS[k] + STDS[k, None] * torch.randn(n, 2, dtype=torch.float64, generator=g)


def reference_solution(sched: NoiseSchedule, x_T: torch.Tensor, t_end: float) -> torch.Tensor:
    """Solve the probability-flow ODE from t = 1 to t_end (x_T is (B, 2, 1, 1))."""
    lam0, lam1 = float(sched.lam(1.0)), float(sched.lam(t_end))
    shape = x_T.shape

    def rhs(lam, y):
        t = sched.inverse_lambda(torch.tensor(lam, dtype=torch.float64))
        a, s = sched.alpha(t), sched.sigma(t)
        x = torch.from_numpy(y).view(-1, 2) * s
        return (np.exp(lam) * x0_given(x, a, s)).numpy().ravel()

    y0 = (x_T.view(-1, 2) / sched.sigma(1.0)).numpy().ravel()
    sol = solve_ivp(rhs, (lam0, lam1), y0, method="DOP853", rtol=1e-11, atol=1e-11)
    y = torch.from_numpy(sol.y[:, -1]).view(-1, 2)
    return (y * sched.sigma(t_end)).view(shape)
