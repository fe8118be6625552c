"""The denoiser: any model callable turned into x0 / epsilon predictions.

Wraps ``model_fn(x, model_t, text) -> output`` with its prediction type
(epsilon, v_prediction, sample / x0, flow velocity eps - x0) and converts the output to
both the data prediction x0 and the noise prediction eps (DPM-Solver's
``model_wrapper``, Lu et al. 2022 App. D; v from Salimans & Ho 2022, Eq. 4),
applies classifier-free guidance (Ho & Salimans 2022, Eq. 6) to the batched
cond / uncond evaluation, and counts function evaluations (``nfe``: a call that
evaluates several sampler steps at once counts each) and forward passes (``model_calls``).
Samplers see it bound to its text as ``samplers.base.BoundModel``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .context import StepContext, step_context
from .models.calling import concat_text
from .schedules import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


@dataclass
class Prediction:
    x0: torch.Tensor
    eps: torch.Tensor


def per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A schedule quantity at t (a number, or one time per sample) shaped to broadcast on x."""
    values = values.to(dtype=x.dtype, device=x.device)
    return values.view(-1, *([1] * (x.ndim - 1))) if values.ndim == 1 else values


class Denoiser:
    """Guided, counted denoiser over a noise schedule.

    ``cond`` and ``uncond`` are text states of batch size B (or None for an
    unconditional model); with guidance > 1 both go through the model as one
    batch of 2B.
    """

    def __init__(self, model_fn: Callable, schedule: NoiseSchedule, prediction_type: str,
                 guidance_scale: float = 1.0):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction_type!r}; "
                             f"choose one of {', '.join(PREDICTION_TYPES)}")
        flow_schedule = schedule.is_flow
        if (prediction_type == "flow") != flow_schedule:
            raise ValueError(
                f"prediction type {prediction_type!r} does not fit a "
                f"{'flow-matching' if flow_schedule else 'VP (alpha/sigma)'} schedule: flow "
                "velocity goes with a FlowMatchSchedule, epsilon / v_prediction / sample with a "
                "NoiseSchedule")
        if guidance_scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {guidance_scale}")
        self.model_fn = model_fn
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.guidance_scale = guidance_scale
        self.nfe = 0          # guided denoiser evaluations
        self.model_calls = 0  # forward passes of the model (a CFG batch counts once)

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale != 1.0

    def raw(self, x: torch.Tensor, t, cond, uncond, ctx: StepContext,
            evaluations: int = 1) -> torch.Tensor:
        """The (guided) model output in the model's own prediction type.

        ``t`` is one continuous time, or a 1-D tensor of one time per sample (parallel
        samplers evaluate several steps in one call, and count it as ``evaluations``)."""
        # never a half-precision timestep: bfloat16 rounds 999 to 1000
        model_t = self.schedule.model_time(t).to(dtype=torch.promote_types(x.dtype, torch.float32),
                                                 device=x.device)
        if model_t.ndim == 0:
            model_t = model_t.expand(x.shape[0])
        if self.uses_guidance:
            x_in = torch.cat([x, x])
            text = concat_text(cond, uncond)
            with step_context(replace(ctx, guidance_halves=("cond", "uncond"))):
                out = self.model_fn(x_in, torch.cat([model_t, model_t]), text)
            out_c, out_u = out.chunk(2)
            out = out_u + self.guidance_scale * (out_c - out_u)
        else:
            with step_context(replace(ctx, branch="cond", guidance_halves=None)):
                out = self.model_fn(x, model_t, cond)
        self.model_calls += 1
        self.nfe += evaluations
        if not torch.isfinite(out).all():
            raise FloatingPointError(
                f"the model returned NaN or inf at step {ctx.step_index} (t={ctx.t:.4f}); "
                "check the model weights and dtype (float16 on CPU is a common cause)")
        return out

    def __call__(self, x: torch.Tensor, t, cond, uncond, ctx: StepContext,
                 evaluations: int = 1) -> Prediction:
        out = self.raw(x, t, cond, uncond, ctx, evaluations)
        return self.convert(out, x, t)

    def convert(self, out: torch.Tensor, x: torch.Tensor, t) -> Prediction:
        alpha = per_sample(self.schedule.alpha(t), x)
        sigma = per_sample(self.schedule.sigma(t), x)
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x - sigma * eps) / alpha
        elif self.prediction_type == "v_prediction":
            x0 = alpha * x - sigma * out
            eps = sigma * x + alpha * out
        elif self.prediction_type == "flow":  # v = eps - x0 and x = alpha x0 + sigma eps
            x0 = (x - sigma * out) / (alpha + sigma)
            eps = x0 + out
        else:  # sample
            x0 = out
            eps = (x - alpha * x0) / sigma
        return Prediction(x0=x0, eps=eps)
