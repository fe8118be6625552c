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
"""

from __future__ import annotations

import torch

from ..context import StepContext
from .base import continuous_grid
from .parallel import ParallelResult, _repeat, step_variances


def parataa(denoiser, x_T: torch.Tensor, steps: int, cond=None, uncond=None, tolerance: float = 0.1,
            memory: int = 1, max_rounds: int | None = None, spacing: str = "trailing",
            ridge: float = 1e-8, generation: int = 0) -> ParallelResult:
    """DDIM (eta = 0) over ``steps`` steps, every state of the trajectory solved at once."""
    if tolerance <= 0 or memory < 0:
        raise ValueError("ParaTAA needs tolerance > 0 and memory >= 0")
    sched = denoiser.schedule
    times = torch.tensor(continuous_grid(denoiser, steps, spacing), dtype=torch.float64)
    alpha, sigma = sched.alpha(times).to(x_T), sched.sigma(times).to(x_T)
    var = step_variances(alpha)
    view = (-1,) + (1,) * x_T.ndim
    b = x_T.shape[0]
    xs = x_T.unsqueeze(0).repeat(steps + 1, *([1] * x_T.ndim))   # (N+1, B, ...)
    history: list[tuple[torch.Tensor, torch.Tensor]] = []
    previous = None
    ctx = StepContext(step_index=0, num_steps=steps, t=float(times[0]),
                      model_t=float(sched.model_time(times[0])), generation=generation)
    max_rounds = steps if max_rounds is None else max_rounds
    rounds, evaluations, a = 0, 0, 0
    while True:
        p = steps - a   # blocks a+1..N are still moving; x_0..x_a are final
        with torch.no_grad():
            pred = denoiser(xs[a:steps].reshape(p * b, *x_T.shape[1:]),
                            times[a:steps].repeat_interleave(b), _repeat(cond, p),
                            _repeat(uncond, p), ctx)
        rounds, evaluations = rounds + 1, evaluations + p
        x0, eps = pred.x0.view(p, *x_T.shape), pred.eps.view(p, *x_T.shape)
        drift = alpha[a + 1:].view(view) * x0 + sigma[a + 1:].view(view) * eps - xs[a:steps]
        residual = torch.zeros_like(xs)
        residual[a + 1:] = xs[a] + torch.cumsum(drift, dim=0) - xs[a + 1:]
        err = residual[a + 1:].square().flatten(2).mean(2).amax(1) / var[a:]
        bad = torch.nonzero(err > tolerance**2)
        stride = max(1, int(bad[0])) if len(bad) else p   # leading blocks within tolerance: final
        if a + stride >= steps or rounds >= max_rounds:
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
