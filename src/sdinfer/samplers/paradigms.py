"""ParaDiGMS: parallel sampling by Picard iteration (Shih et al., NeurIPS 2023, Algorithm 1).

A memoryless sampler is x_{i+1} = x_i + d_i(x_i).  Picard iteration keeps a guess
for every x_i in a sliding window [a, a + p) and updates them all at once,

    x_{a+k+1} <- x_a + sum_{j=a}^{a+k} d_j(x_j),        k = 0 .. p-1,

with the p drifts d_j evaluated in one batched model call (one *round*).  The
window then slides past the leading steps whose update moved less than the
tolerance, ||x_new - x_old||^2 / (D v_{j+1}) <= tau^2 for every sample of the
batch, with v_i the DDPM posterior variance of the step from t_i to t_{i+1} (the
noise a DDPM step would add there; the paper's and diffusers' ``_get_variance``
normalisation; the final state takes the last step's), and always by at least one
step, whose value is exact.  Latency falls to the number of
rounds; total evaluations rise.  Drifts here are DDIM's (eta = 0; DPM-Solver-1)
or DDPM's with its noise drawn up front.  ``paradigms`` runs on a denoiser;
``ParaDiGMS`` is the sampler ``paradigms`` of the registry, on the loop's grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..devices import draw_noise
from .base import BoundModel, continuous_grid

DRIFTS = ("ddim", "ddpm")


@dataclass
class ParallelResult:
    x: torch.Tensor
    rounds: int        # batched model calls: the latency in units of one step
    evaluations: int   # step evaluations summed over rounds (the compute)
    steps: int


def step_variances(alpha: torch.Tensor) -> torch.Tensor:
    """v_1..v_N for a grid's alpha_0..alpha_N: the DDPM posterior variance of the step from
    t_i to t_{i+1}, (1 - abar_{i+1}) / (1 - abar_i) (1 - abar_i / abar_{i+1}); v_N = v_{N-1}."""
    abar = alpha.double() ** 2
    if len(abar) < 3:   # one step: exact after one round whatever the tolerance
        return torch.ones(1, dtype=torch.float64, device=alpha.device)
    v = (1 - abar[2:]) / (1 - abar[1:-1]) * (1 - abar[1:-1] / abar[2:])
    return torch.cat([v, v[-1:]]).clamp(min=1e-12)


def check_paradigms_options(window, tolerance, drift) -> None:
    if drift not in DRIFTS:
        raise ValueError(f"ParaDiGMS runs on {', '.join(DRIFTS)}, not {drift!r}")
    if window < 1 or tolerance <= 0:
        raise ValueError("ParaDiGMS needs window >= 1 and tolerance > 0")


@dataclass
class ParaDiGMS:
    """ParaDiGMS as a sampler (``paradigms``, options ``window``, ``tolerance``, ``drift``):
    the loop's ``steps`` steps on its grid, ``window`` of them per batched model call; the
    denoiser counts every step evaluated (``nfe``) and every batched call (``model_calls``)."""

    window: int = 16
    tolerance: float = 0.1
    drift: str = "ddim"
    name: str = "paradigms"
    min_steps: int = 1
    spacing: str = "trailing"

    def __post_init__(self) -> None:
        check_paradigms_options(self.window, self.tolerance, self.drift)

    def sample(self, model, x, times, state, callback=None) -> torch.Tensor:
        return paradigms_on_grid(model, x, times, self.window, self.tolerance, self.drift,
                                 state.generator, callback).x


def paradigms(denoiser, x_T: torch.Tensor, steps: int, cond=None, uncond=None, window: int = 16,
              tolerance: float = 0.1, drift: str = "ddim", spacing: str = "trailing",
              generator: torch.Generator | None = None, generation: int = 0) -> ParallelResult:
    check_paradigms_options(window, tolerance, drift)
    times = continuous_grid(denoiser, steps, spacing)
    return paradigms_on_grid(BoundModel(denoiser, cond, uncond, generation), x_T, times, window,
                             tolerance, drift, generator)


def paradigms_on_grid(model, x_T: torch.Tensor, grid: list[float], window: int, tolerance: float,
                      drift: str, generator: torch.Generator | None = None,
                      callback=None) -> ParallelResult:
    """ParaDiGMS over the times ``grid`` (its ``len(grid) - 1`` steps) on a bound model;
    ``callback(i, x)`` as step i becomes final."""
    sched = model.schedule
    steps = len(grid) - 1
    times = torch.tensor(grid, dtype=torch.float64)
    alpha, sigma = sched.alpha(times), sched.sigma(times)
    noise = None
    if drift == "ddpm":
        noise = draw_noise((steps, *x_T.shape), generator, x_T)
    var = step_variances(alpha).to(x_T)
    b = x_T.shape[0]
    xs = [x_T] * (steps + 1)
    a, rounds, evaluations = 0, 0, 0
    while a < steps:
        end = min(a + window, steps)
        p = end - a
        idx = torch.arange(a, end)
        x_in = torch.cat(xs[a:end])
        t_in = times[idx].repeat_interleave(b)
        with torch.no_grad(), model.at_step(a, steps, float(times[a])):
            pred = model.repeated(p)(x_in, t_in)
        rounds += 1
        evaluations += p
        shape = (p, b, *x_T.shape[1:])
        x0, eps, x_cur = pred.x0.view(shape), pred.eps.view(shape), x_in.view(shape)
        view = (p,) + (1,) * x_T.ndim
        a_n, s_n = alpha[idx + 1].view(view).to(x_T), sigma[idx + 1].view(view).to(x_T)
        if drift == "ddim":
            x_next = a_n * x0 + s_n * eps
        else:
            a_t = alpha[idx].view(view).to(x_T)
            ab_t, ab_n = a_t**2, a_n**2
            ratio = ab_t / ab_n
            mean = (ab_n.sqrt() * (1 - ratio) / (1 - ab_t)) * x0 + \
                   (ratio.sqrt() * (1 - ab_n) / (1 - ab_t)) * x_cur
            std = ((1 - ab_n) / (1 - ab_t) * (1 - ratio)).clamp(min=0).sqrt()
            x_next = mean + std * noise[a:end]
        new = xs[a] + torch.cumsum(x_next - x_cur, dim=0)
        old = torch.stack(xs[a + 1:end + 1])
        # per sample, worst sample decides: (p, B) -> (p,)
        err = (new - old).square().flatten(2).mean(2).amax(1) / var[idx]
        for k in range(p):
            xs[a + 1 + k] = new[k]
        bad = torch.nonzero(err > tolerance**2)
        stride = max(1, int(bad[0]) if len(bad) else p)
        for j in range(end + 1, steps + 1):  # guesses past the window start from the newest value
            xs[j] = xs[end]
        if callback is not None:
            for k in range(a, min(a + stride, steps)):
                callback(k, xs[k + 1])
        a += stride
    return ParallelResult(x=xs[steps], rounds=rounds, evaluations=evaluations, steps=steps)
