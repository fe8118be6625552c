"""The analytical first step (AFS): Dockhorn, Vahdat & Kreis, "GENIE: Higher-Order Denoising
Diffusion Solvers" (NeurIPS 2022), as used by AMED-Solver (Zhou et al., CVPR 2024) and GITS
(Chen et al., ICML 2024, Sec. 4): at the first time of the grid the sample is almost pure noise,
so the denoiser's output there is replaced by that of data that are a standard Gaussian,

    x0_hat = alpha x / (alpha^2 + sigma^2),    eps_hat = sigma x / (alpha^2 + sigma^2),

the posterior means of x0 and eps given x = alpha x0 + sigma eps (GITS writes it for EDM as
d = x / sqrt(1 + sigma^2)).  The first model evaluation is saved: a sampler of K steps costs
K - 1 evaluations.  Any sampler that takes the model's prediction gets it.
"""

from __future__ import annotations

from ..context import current_step
from ..denoiser import Prediction, per_sample


def check_supports(sampler) -> None:
    """Samplers that call the model's raw output themselves would bypass the analytic step, and
    samplers with their own loop (adaptive, parallel) have no first grid step to replace."""
    from .base import steps_one_by_one
    from .diffusers_scheduler import DiffusersSampler
    from .sampler_schedule import SamplerSchedule

    if isinstance(sampler, (DiffusersSampler, SamplerSchedule)) or not steps_one_by_one(sampler):
        raise ValueError(f"the analytic first step works with sdinfer's single step-by-step samplers, "
                         f"not with {type(sampler).__name__}; drop "
                         "analytic_first_step or use one such sampler")


class AnalyticFirstStep:
    """The bound model (``base.BoundModel``) whose evaluation at the first step's time
    ``t_first`` is the Gaussian-data prediction (a second evaluation within the first step, as
    Heun's, calls the model); everything else, evaluation counts included, is the wrapped
    model's."""

    def __init__(self, model, t_first: float):
        self.model, self.t_first = model, t_first

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, t) -> Prediction:
        ctx = current_step()
        if ctx is None or ctx.step_index != 0 or t != self.t_first:
            return self.model(x, t)
        sched = self.model.schedule
        alpha, sigma = per_sample(sched.alpha(t), x), per_sample(sched.sigma(t), x)
        norm = alpha.square() + sigma.square()
        return Prediction(x0=alpha * x / norm, eps=sigma * x / norm)
