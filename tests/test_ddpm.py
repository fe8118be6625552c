"""Our DDPM against diffusers' DDPMScheduler with the same noise, float64."""

import pytest
import torch
from diffusers import DDPMScheduler

from sdinfer.denoiser import Denoiser
from sdinfer.samplers import get_sampler, sample_loop
from sdinfer.schedules import NoiseSchedule
from test_ddim import model_fn


@pytest.mark.parametrize("steps", [1, 10, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_matches_diffusers(steps, prediction_type):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sched = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False,
                          prediction_type=prediction_type, variance_type="fixed_small")
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(9)
    ref = x.clone()
    for t in sched.timesteps:
        ref = sched.step(model_fn(ref, t.double().expand(2)), t, ref, generator=g).prev_sample
    den = Denoiser(model_fn, NoiseSchedule(sched.alphas_cumprod), prediction_type)
    ours = sample_loop(den, get_sampler("ddpm"), x.clone(), steps, None, None,
                       generator=torch.Generator().manual_seed(9), timesteps=sched.timesteps.tolist())
    assert float((ours - ref).norm() / ref.norm()) <= 1e-6
