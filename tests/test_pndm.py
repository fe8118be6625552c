"""PLMS against diffusers' PNDMScheduler (skip_prk_steps), float64."""

import pytest
import torch
from diffusers import PNDMScheduler

from sdinfer.denoiser import Denoiser
from sdinfer.samplers import get_sampler, sample_loop
from sdinfer.schedules import NoiseSchedule
from test_ddim import model_fn


@pytest.mark.parametrize("steps", [2, 5, 10, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon"])
def test_plms_matches_diffusers(steps, prediction_type):
    # Only epsilon: for v models diffusers combines the raw v outputs of different steps and
    # converts them at the current one; we combine noise predictions, as the paper does.
    sched = PNDMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, skip_prk_steps=True,
                          prediction_type=prediction_type)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = sched.alphas_cumprod[0]
    sched.set_timesteps(steps)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref = x.clone()
    for t in sched.timesteps:
        ref = sched.step(model_fn(ref, t.double().expand(2)), t, ref).prev_sample
    den = Denoiser(model_fn, NoiseSchedule(sched.alphas_cumprod), prediction_type)
    ours = sample_loop(den, get_sampler("plms"), x.clone(), steps, None, None, final="sigma_min")
    rel = float((ours - ref).norm() / ref.norm())
    assert rel <= 1e-6, rel
    assert den.nfe == len(sched.timesteps) == steps + 1
