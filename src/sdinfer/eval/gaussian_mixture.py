"""An exact model for testing samplers: a Gaussian mixture whose denoiser is analytic.

Data x0 ~ sum_k w_k N(mu_k, s_k^2 I).  Under x_t = alpha x0 + sigma eps the
noisy marginal is sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I) and

    E[x0 | x_t] = sum_k g_k(x_t) (mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x_t - alpha mu_k)),

with g_k the posterior weights.  ``reference_solution`` integrates the probability
flow ODE in lambda, d(x / sigma)/d lambda = e^lambda x0(x), with scipy at tight tolerance.

``GuidedMixture``: the guided cases, a class-conditional mixture in any shape (image-like
3x8x8, 64-d vectors) with anisotropic covariances Sigma_k = U_k diag(v_k) U_k^T, where class c
draws component k with probability P[c, k].  Its conditional denoiser E[x0 | x_t, c] and
unconditional one E[x0 | x_t] (the same components weighted by the class prior) are exact:

    E[x0 | x_t, k] = mu_k + alpha Sigma_k (alpha^2 Sigma_k + sigma^2 I)^-1 (x_t - alpha mu_k),

and classifier-free guidance is x0_u + w (x0_c - x0_u) (the same combination on eps, which is
affine in x0 at fixed x_t).  ``GuidedMixture.reference`` solves the guided probability-flow ODE
to clean data in the variance-exploding form, dx/d log s = x - D(x, s) with s = sigma / alpha
and x the sample over alpha, with scipy's DOP853 at rtol = atol = 1e-10 down to s = 1e-7.
``MIXTURES`` names the shapes the benchmarks use and ``PROBLEMS`` pairs them with guidance
scales (1: unguided, the unconditional model alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(eq=False)
class GuidedMixture:
    """A class-conditional Gaussian mixture on samples of ``shape`` (float64 throughout).

    ``means`` (K, D), ``axes`` (K, D, D) orthonormal columns, ``variances`` (K, D) along them,
    ``class_weights`` (C, K) rows summing to 1, ``class_prior`` (C,).  Labels are class
    indices; a negative label is the unconditional model."""

    name: str
    shape: tuple[int, ...]
    means: torch.Tensor
    axes: torch.Tensor
    variances: torch.Tensor
    class_weights: torch.Tensor
    class_prior: torch.Tensor

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    @property
    def classes(self) -> int:
        return self.class_weights.shape[0]

    def weights(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, K) component weights: P[c] for a class label, the marginal for a negative one."""
        labels = torch.as_tensor(labels).reshape(-1).long()
        marginal = self.class_prior @ self.class_weights
        cond = self.class_weights[labels.clamp(min=0)]
        return torch.where((labels < 0)[:, None], marginal[None], cond)

    def x0(self, x: torch.Tensor, alpha, sigma, labels) -> torch.Tensor:
        """E[x0 | x_t, label] for x (B, *shape); alpha, sigma numbers or one per sample."""
        b = x.shape[0]
        flat = x.reshape(b, -1).to(torch.float64)
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1, 1)   # (B or 1, 1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
        var = alpha**2 * self.variances[None] + sigma**2                         # (B, K, D)
        diff = flat[:, None, :] - alpha * self.means[None]                       # (B, K, D)
        z = torch.einsum("bkd,kde->bke", diff, self.axes)                        # along the axes
        logp = (torch.log(self.weights(labels).clamp(min=1e-300))
                - 0.5 * (z.square() / var).sum(-1) - 0.5 * torch.log(var).sum(-1))
        g = torch.softmax(logp, dim=1)                                           # (B, K)
        shrunk = alpha * self.variances[None] / var * z
        means = self.means[None] + torch.einsum("bke,kde->bkd", shrunk, self.axes)
        return (g[..., None] * means).sum(1).reshape(x.shape).to(x.dtype)

    def guided_x0(self, x: torch.Tensor, alpha, sigma, labels, guidance: float) -> torch.Tensor:
        """Classifier-free guidance on the exact denoisers: x0_u + w (x0_c - x0_u); w = 1 is the
        conditional model (a negative label: the unconditional one)."""
        cond = self.x0(x, alpha, sigma, labels)
        if guidance == 1.0:
            return cond
        uncond = self.x0(x, alpha, sigma, torch.full_like(torch.as_tensor(labels).reshape(-1), -1))
        return uncond + guidance * (cond - uncond)

    def model_fn(self, sched: NoiseSchedule):
        """A 'sample'-prediction model ``fn(x, model_t, labels)`` for ``Denoiser`` (labels as
        its conditioning: a (B,) tensor of class indices; ``uncond`` = -1 labels, so that the
        denoiser's own classifier-free guidance runs on the exact denoisers)."""
        def fn(x, model_t, text=None):
            t = sched.continuous_time(torch.as_tensor(model_t, dtype=torch.float64).reshape(-1))
            labels = torch.full((x.shape[0],), -1) if text is None else text
            return self.x0(x, sched.alpha(t), sched.sigma(t), labels)
        return fn

    def guided_model(self, sched: NoiseSchedule, labels: torch.Tensor, guidance: float,
                     prediction: str = "sample"):
        """``fn(x, model_t)``: the guided model with its labels bound, for samplers that call a
        model without conditioning (diffusers' schedulers, k-diffusion): the data prediction,
        or with ``prediction="epsilon"`` the noise prediction."""
        def fn(x, model_t, text=None):
            t = sched.continuous_time(torch.as_tensor(model_t, dtype=torch.float64).reshape(-1))
            a, s = sched.alpha(t), sched.sigma(t)
            x0 = self.guided_x0(x, a, s, labels, guidance)
            if prediction == "sample":
                return x0
            shape = (-1,) + (1,) * (x.ndim - 1)
            return (x - torch.as_tensor(a, dtype=x.dtype).reshape(shape) * x0) / \
                torch.as_tensor(s, dtype=x.dtype).reshape(shape)
        return fn

    def sample_data(self, n: int, seed: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        """n draws of x0 (of the given labels' classes; None: from the marginal)."""
        g = torch.Generator().manual_seed(seed)
        if labels is None:
            labels = torch.full((n,), -1)
        w = self.weights(labels)
        k = torch.multinomial(w, 1, generator=g).reshape(-1)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=g) * self.variances[k].sqrt()
        return (self.means[k] + torch.einsum("bkd,bd->bk", self.axes[k], z)).reshape(n, *self.shape)

    def noise(self, n: int, seed: int, guided: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """x_T (n, *shape) and labels (n,): uniform over the classes, or all -1 if not guided."""
        g = torch.Generator().manual_seed(seed)
        x_T = torch.randn(n, *self.shape, dtype=torch.float64, generator=g)
        labels = torch.randint(0, self.classes, (n,), generator=g) if guided else torch.full((n,), -1)
        return x_T, labels

    def reference(self, sched: NoiseSchedule, x_T: torch.Tensor, labels, guidance: float,
                  s_end: float = 1e-7, rtol: float = 1e-10, chunk: int = 64) -> torch.Tensor:
        """The exact end (t = 0) of the guided probability-flow ODE from x_T at t = 1, solved
        with scipy in log s (s = sigma / alpha, the variance-exploding noise level), ``chunk``
        trajectories per system."""
        labels = torch.as_tensor(labels).reshape(-1)
        a1, s1 = float(sched.alpha(1.0)), float(sched.sigma(1.0))
        out = []
        for start in range(0, x_T.shape[0], chunk):
            xb, lb = x_T[start:start + chunk].to(torch.float64), labels[start:start + chunk]
            shape = xb.shape

            def rhs(log_s, y, lb=lb, shape=shape):
                s = math.exp(log_s)
                alpha = 1.0 / math.sqrt(1.0 + s * s)
                x = torch.from_numpy(y).view(shape)
                d = self.guided_x0(x * alpha, alpha, s * alpha, lb, guidance)
                return (x - d).numpy().ravel()

            y0 = (xb / a1).numpy().ravel()
            sol = solve_ivp(rhs, (math.log(s1 / a1), math.log(s_end)), y0, method="DOP853",
                            rtol=rtol, atol=rtol)
            if not sol.success:
                raise RuntimeError(f"the mixture's reference solve failed: {sol.message}")
            out.append(torch.from_numpy(sol.y[:, -1].copy()).view(shape))
        return torch.cat(out).to(x_T.dtype)


def make_mixture(name: str, shape: tuple[int, ...], components: int, classes: int, seed: int,
                 min_std: float = 0.05, max_std: float = 0.5, leak: float = 0.1) -> GuidedMixture:
    """A random mixture: smooth means in [-1, 1]-ish (image-like shapes: low-frequency patterns),
    standard deviations along random axes log-uniform in [min_std, max_std], each class owning
    ``components // classes`` components with the rest ``leak`` spread over all."""
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    if len(shape) == 3:   # image-like: a coarse pattern, upsampled, per channel
        c, h, w = shape
        coarse = torch.rand(components, c, max(h // 4, 1), max(w // 4, 1), dtype=torch.float64, generator=g)
        means = torch.nn.functional.interpolate(coarse * 1.6 - 0.8, size=(h, w), mode="bilinear",
                                                align_corners=False).reshape(components, d)
    else:
        means = torch.randn(components, d, dtype=torch.float64, generator=g) / math.sqrt(d) * 2.0
    axes = torch.linalg.qr(torch.randn(components, d, d, dtype=torch.float64, generator=g))[0]
    log_std = torch.rand(components, d, dtype=torch.float64, generator=g) * \
        (math.log(max_std) - math.log(min_std)) + math.log(min_std)
    owner = torch.arange(components) % classes
    class_weights = torch.full((classes, components), leak / components, dtype=torch.float64)
    for c in range(classes):
        mine = owner == c
        class_weights[c, mine] += (1 - leak) / int(mine.sum())
    class_weights = class_weights / class_weights.sum(1, keepdim=True)
    prior = torch.full((classes,), 1.0 / classes, dtype=torch.float64)
    return GuidedMixture(name, tuple(shape), means, axes, (2 * log_std).exp(), class_weights, prior)


MIXTURES = {
    "image-3x8x8": lambda: make_mixture("image-3x8x8", (3, 8, 8), components=8, classes=4, seed=11),
    "vec64": lambda: make_mixture("vec64", (64,), components=12, classes=6, seed=12),
}
# (mixture, guidance scale): the benchmarks' problems; 1 is unguided (the unconditional model)
PROBLEMS = [("image-3x8x8", 1.0), ("image-3x8x8", 7.5), ("vec64", 1.0), ("vec64", 5.0), ("vec64", 10.0)]
