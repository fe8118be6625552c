"""ParaTAA: parallel sampling as a triangular nonlinear system solved with triangular
Anderson acceleration (Tang et al., "Accelerating Parallel Sampling of Diffusion Models",
ICML 2024, Algorithm 1 on the full-trajectory system).

The N steps of a memoryless sampler, x_{i+1} = x_i + d_i(x_i), are the fixed point
X = G(X) of  G(X)_{i+1} = x_0 + sum_{j<=i} d_j(x_j)  over all states x_{1..N} at once.  One
*round* evaluates every d_j in one batched model call.  Plain fixed-point iteration
X <- G(X) over the whole trajectory is ParaDiGMS with one window of N steps; Anderson
acceleration mixes the last m iterates: with residuals R = G(X) - X and the differences
dX, dR of the last m rounds, gamma = argmin ||R - dR gamma|| and
X <- X + R - (dX + dR) gamma.  The system is triangular (x_i depends on x_{<i} only), so
ParaTAA solves one least-squares problem per block i over the rows of blocks <= i
(cumulative Gram matrices), which keeps every block causal.  Iteration stops when every
block's update is within the tolerance of ParaDiGMS, ||R_i||^2 / (D v_i) <= tau^2,
and returns G(X) (the update of that last round).  As in ParaDiGMS, the leading blocks
within tolerance become final after each round (at least one, which is exact), and later
rounds evaluate only the steps after them.  memory = 0 is ParaDiGMS with one window of N.
``parataa`` runs on a denoiser; ``ParaTAA`` is the sampler ``parataa`` of the registry, on the
loop's grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import BoundModel, continuous_grid
from .paradigms import ParallelResult, step_variances


def check_parataa_options(tolerance, memory) -> None:
    if tolerance <= 0 or memory < 0:
        raise ValueError("ParaTAA needs tolerance > 0 and memory >= 0")


@dataclass
class ParaTAA:
    """ParaTAA as a sampler (``parataa``, options ``tolerance``, ``memory``, ``max_rounds``,
    ``ridge``): the loop's ``steps`` steps on its grid, all evaluated in each batched model
    call; the denoiser counts every step evaluated (``nfe``) and every batched call
    (``model_calls``)."""

    tolerance: float = 0.1
    memory: int = 1
    max_rounds: int | None = None
    ridge: float = 1e-8
    name: str = "parataa"
    min_steps: int = 1
    spacing: str = "trailing"

    def __post_init__(self) -> None:
        check_parataa_options(self.tolerance, self.memory)

    def sample(self, model, x, times, state, callback=None) -> torch.Tensor:
        return parataa_on_grid(model, x, times, self.tolerance, self.memory, self.max_rounds,
                               self.ridge, callback).x


def parataa(denoiser, x_T: torch.Tensor, steps: int, cond=None, uncond=None, tolerance: float = 0.1,
            memory: int = 1, max_rounds: int | None = None, spacing: str = "trailing",
            ridge: float = 1e-8, generation: int = 0) -> ParallelResult:
    """DDIM (eta = 0) over ``steps`` steps, every state of the trajectory solved at once."""
    check_parataa_options(tolerance, memory)
    times = continuous_grid(denoiser, steps, spacing)
    return parataa_on_grid(BoundModel(denoiser, cond, uncond, generation), x_T, times, tolerance,
                           memory, max_rounds, ridge)


def parataa_on_grid(model, x_T: torch.Tensor, grid: list[float], tolerance: float, memory: int,
                    max_rounds: int | None, ridge: float, callback=None) -> ParallelResult:
    """ParaTAA over the times ``grid`` (its ``len(grid) - 1`` steps) on a bound model;
    ``callback(i, x)`` as step i becomes final."""
    sched = model.schedule
    steps = len(grid) - 1
    times = torch.tensor(grid, dtype=torch.float64)
    alpha, sigma = sched.alpha(times).to(x_T), sched.sigma(times).to(x_T)
    var = step_variances(alpha)
    view = (-1,) + (1,) * x_T.ndim
    b = x_T.shape[0]
    xs = x_T.unsqueeze(0).repeat(steps + 1, *([1] * x_T.ndim))   # (N+1, B, ...)
    history: list[tuple[torch.Tensor, torch.Tensor]] = []
    previous = None
    max_rounds = steps if max_rounds is None else max_rounds
    rounds, evaluations, a = 0, 0, 0
    while True:
        p = steps - a   # blocks a+1..N are still moving; x_0..x_a are final
        with torch.no_grad(), model.at_step(0, steps, float(times[0])):
            pred = model.repeated(p)(xs[a:steps].reshape(p * b, *x_T.shape[1:]),
                                     times[a:steps].repeat_interleave(b))
        rounds, evaluations = rounds + 1, evaluations + p
        x0, eps = pred.x0.view(p, *x_T.shape), pred.eps.view(p, *x_T.shape)
        drift = alpha[a + 1:].view(view) * x0 + sigma[a + 1:].view(view) * eps - xs[a:steps]
        residual = torch.zeros_like(xs)
        residual[a + 1:] = xs[a] + torch.cumsum(drift, dim=0) - xs[a + 1:]
        err = residual[a + 1:].square().flatten(2).mean(2).amax(1) / var[a:]
        bad = torch.nonzero(err > tolerance**2)
        stride = max(1, int(bad[0])) if len(bad) else p   # leading blocks within tolerance: final
        if a + stride >= steps or rounds >= max_rounds:
            if callback is not None:
                for k in range(a, steps):
                    callback(k, xs[k + 1] + residual[k + 1])
            return ParallelResult(x=xs[steps] + residual[steps], rounds=rounds,
                                  evaluations=evaluations, steps=steps)
        if previous is not None and memory > 0:
            history.append((xs - previous[0], residual - previous[1]))
            del history[:-memory]
        previous = (xs, residual)
        picard = xs + residual
        new = picard - _triangular_anderson(history, residual, ridge) if history else picard
        # blocks that become final take their fixed-point update, as in ParaDiGMS
        new[a + 1:a + stride + 1] = picard[a + 1:a + stride + 1]
        xs = new
        if callback is not None:
            for k in range(a, a + stride):
                callback(k, xs[k + 1])
        a += stride


def _triangular_anderson(history, residual: torch.Tensor, ridge: float) -> torch.Tensor:
    """(dX + dR) gamma_i for every block i and sample, gamma_i fitted on the blocks <= i."""
    n, b = residual.shape[:2]
    dx = torch.stack([h[0].reshape(n, b, -1) for h in history], dim=-1)   # (N+1, B, F, m)
    dr = torch.stack([h[1].reshape(n, b, -1) for h in history], dim=-1)
    gram = torch.cumsum(torch.einsum("nbfm,nbfk->nbmk", dr, dr), dim=0)
    rhs = torch.cumsum(torch.einsum("nbfm,nbf->nbm", dr, residual.reshape(n, b, -1)), dim=0)
    m = gram.shape[-1]
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)[..., None, None] / m
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    gamma = torch.linalg.solve(gram + (ridge * scale + 1e-30) * eye, rhs.unsqueeze(-1)).squeeze(-1)
    return torch.einsum("nbfm,nbm->nbf", dx + dr, gamma).reshape(residual.shape)
