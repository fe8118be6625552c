"""DDIM: Denoising Diffusion Implicit Models (Song, Meng & Ermon, ICLR 2021).

Implements Eq. (12) with the variance of Eq. (16), written with alpha_t (the
square root of diffusers' alphas_cumprod) and sigma_t = sqrt(1 - alpha_t^2):

    x0_hat  = denoiser's data prediction at (x_t, t)
    s       = eta * sqrt(sigma_next^2 / sigma_t^2) * sqrt(1 - alpha_t^2 / alpha_next^2)
    x_next  = alpha_next * x0_hat + sqrt(sigma_next^2 - s^2) * eps_hat + s * z

eta = 0 is the deterministic probability-flow sampler; eta = 1 is DDPM-like.
"""

from __future__ import annotations

from dataclasses import dataclass


from ..devices import draw_noise
from .base import StepSampler


@dataclass
class DDIM(StepSampler):
    eta: float = 0.0
    name: str = "ddim"
    min_steps: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) \
                or not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"ddim eta must be a number in [0, 1], got {self.eta!r}")

    def step(self, model, x, t, t_next, state):
        pred = model(x, t)
        sched = model.schedule
        a_t, s_t = sched.alpha(t).item(), sched.sigma(t).item()
        a_n, s_n = sched.alpha(t_next).item(), sched.sigma(t_next).item()
        s = 0.0
        if self.eta > 0 and s_n > 0:
            s = self.eta * (s_n / s_t) * (1.0 - (a_t / a_n) ** 2) ** 0.5
        x_next = a_n * pred.x0 + max(s_n**2 - s**2, 0.0) ** 0.5 * pred.eps
        if s > 0:
            noise = draw_noise(x.shape, state.generator, x)
            x_next = x_next + s * noise
        return x_next
