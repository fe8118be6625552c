"""Noise schedules in continuous time: alpha(t), sigma(t), lambda(t) and its inverse.

Following DPM-Solver (Lu et al. 2022, Sec. 2 and App. D): a VP diffusion
x_t = alpha_t x_0 + sigma_t eps with alpha_t^2 + sigma_t^2 = 1 and half
log-SNR lambda_t = log(alpha_t / sigma_t).  A discrete schedule of N training
steps (diffusers' ``alphas_cumprod``) is made continuous by piecewise-linear
interpolation of lambda on t_n = (n + 1) / N, n = 0..N-1 (lambda is minus the
log of diffusers' sigma = sqrt((1 - abar) / abar), so a fractional timestep means
what diffusers' ``_sigma_to_t`` makes of it), and the model's own timestep for a
continuous t is ``(t - 1/N) * N`` (0..N-1).  t = 0 is the clean data: alpha = 1,
sigma = 0, lambda = +inf.

Every sampler is written once against this class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class NoiseSchedule:
    """A discrete VP schedule with continuous-time access."""

    alphas_cumprod: torch.Tensor  # (N,), float64

    def __post_init__(self) -> None:
        ac = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or len(ac) < 2:
            raise ValueError("alphas_cumprod must be a 1-D sequence of at least 2 values")
        if not torch.all((ac > 0) & (ac <= 1)) or not torch.all(ac[1:] <= ac[:-1]):
            raise ValueError("alphas_cumprod must lie in (0, 1] and decrease")
        self.alphas_cumprod = ac
        self.num_train_timesteps = len(ac)
        self._t = torch.linspace(1.0, len(ac), len(ac), dtype=torch.float64) / len(ac)
        self._lam = 0.5 * (torch.log(ac) - torch.log1p(-ac))
        self.t_min = float(self._t[0])
        self.t_max = 1.0
        self._scalars: dict[float, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    is_flow = False
    default_spacing = "trailing"
    _CACHE_SIZE = 4096

    # ---- construction ------------------------------------------------------
    @classmethod
    def from_betas(cls, betas) -> "NoiseSchedule":
        betas = torch.as_tensor(betas, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def from_diffusers_config(cls, config) -> "NoiseSchedule":
        """Build from a diffusers scheduler config (dict or FrozenDict)."""
        n = int(config.get("num_train_timesteps", 1000))
        kind = config.get("beta_schedule", "linear")
        start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        if config.get("trained_betas") is not None:
            betas = torch.as_tensor(config["trained_betas"], dtype=torch.float64)
        elif kind == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            f = [math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
            betas = torch.tensor([min(1 - f[i + 1] / f[i], 0.999) for i in range(n)],
                                 dtype=torch.float64)
        else:
            raise ValueError(f"unsupported beta_schedule {kind!r}; supported: linear, "
                             "scaled_linear, squaredcos_cap_v2, or trained_betas")
        return cls.from_betas(betas)

    # ---- continuous-time quantities -----------------------------------------
    def lam(self, t) -> torch.Tensor:
        if isinstance(t, (float, int)):
            return self._scalar(t)[0]
        t = torch.as_tensor(t, dtype=torch.float64)
        lam = _interp(t, self._t, self._lam)
        return torch.where(t <= 0, torch.full_like(lam, math.inf), lam)

    def log_alpha(self, t) -> torch.Tensor:
        return -0.5 * torch.nn.functional.softplus(-2.0 * self.lam(t))

    def alpha(self, t) -> torch.Tensor:
        if isinstance(t, (float, int)):
            return self._scalar(t)[1]
        return torch.exp(self.log_alpha(t))

    def sigma(self, t) -> torch.Tensor:
        if isinstance(t, (float, int)):
            return self._scalar(t)[2]
        return torch.exp(-0.5 * torch.nn.functional.softplus(2.0 * self.lam(t)))

    def _scalar(self, t: float):
        """(lambda, alpha, sigma) at a number t, computed once: samplers ask for the same few
        times many times per step, and the table lookups would cost more than the update."""
        hit = self._scalars.get(t)
        if hit is None:
            tt = torch.tensor(float(t), dtype=torch.float64)
            lam = torch.where(tt <= 0, torch.tensor(math.inf, dtype=torch.float64),
                              _interp(tt, self._t, self._lam))
            hit = (lam, torch.exp(-0.5 * torch.nn.functional.softplus(-2.0 * lam)),
                   torch.exp(-0.5 * torch.nn.functional.softplus(2.0 * lam)))
            if len(self._scalars) >= self._CACHE_SIZE:
                self._scalars.clear()
            self._scalars[t] = hit
        return hit

    def inverse_lambda(self, lam) -> torch.Tensor:
        lam = torch.as_tensor(lam, dtype=torch.float64)
        # lambda decreases in t: interpolate on the reversed table.
        return _interp(lam, self._lam.flip(0), self._t.flip(0))

    def model_time(self, t) -> torch.Tensor:
        """The model's own timestep (0..N-1) for a continuous t."""
        return (torch.as_tensor(t, dtype=torch.float64) - 1.0 / self.num_train_timesteps) \
            * self.num_train_timesteps

    def continuous_time(self, model_t) -> torch.Tensor:
        return (torch.as_tensor(model_t, dtype=torch.float64) + 1.0) / self.num_train_timesteps


@dataclass
class FlowMatchSchedule:
    """Rectified flow (Liu et al. 2022; Esser et al. 2024, SD3): x_t = (1 - t) x0 + t eps.

    alpha_t = 1 - t, sigma_t = t, lambda_t = log((1 - t) / t); the model's own
    timestep is t N (diffusers' ``sigmas * num_train_timesteps``).  ``shift``
    moves the sampling grid towards high noise, t' = shift t / (1 + (shift - 1) t)
    (SD3 uses 3.0).  The samplers written against alpha, sigma and lambda run
    on it unchanged; t = 1 is pure noise (alpha = 0, lambda = -inf).
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0

    is_flow = True
    default_spacing = "flow"

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError("num_train_timesteps must be at least 2")
        if self.shift <= 0:
            raise ValueError(f"flow shift must be > 0, got {self.shift}")
        self.t_min = 1.0 / self.num_train_timesteps
        self.t_max = 1.0

    @classmethod
    def from_diffusers_config(cls, config) -> "FlowMatchSchedule":
        if config.get("use_dynamic_shifting"):
            raise ValueError("resolution-dependent shifting (use_dynamic_shifting, FLUX) is not "
                             "supported yet; pass a config with a fixed shift")
        return cls(int(config.get("num_train_timesteps", 1000)), float(config.get("shift", 1.0)))

    def shifted(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.shift * t / (1 + (self.shift - 1) * t)

    def alpha(self, t) -> torch.Tensor:
        return 1.0 - torch.as_tensor(t, dtype=torch.float64)

    def sigma(self, t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64)

    def lam(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.log1p(-t) - torch.log(t)

    def inverse_lambda(self, lam) -> torch.Tensor:
        return torch.sigmoid(-torch.as_tensor(lam, dtype=torch.float64))

    def model_time(self, t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64) * self.num_train_timesteps

    def continuous_time(self, model_t) -> torch.Tensor:
        return torch.as_tensor(model_t, dtype=torch.float64) / self.num_train_timesteps


def schedule_from_diffusers(config) -> NoiseSchedule | FlowMatchSchedule:
    """The schedule of a diffusers scheduler config (or scheduler object)."""
    config = getattr(config, "config", config)
    name = config.get("_class_name", "") or ""
    if name.startswith("FlowMatch") or "shift" in config and "beta_schedule" not in config:
        return FlowMatchSchedule.from_diffusers_config(config)
    return NoiseSchedule.from_diffusers_config(config)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation, linear extrapolation outside [xp[0], xp[-1]]."""
    idx = torch.clamp(torch.searchsorted(xp, x.contiguous()), 1, len(xp) - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    y0, y1 = fp[idx - 1], fp[idx]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
