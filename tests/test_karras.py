"""Euler and Heun on the Karras grid against diffusers' schedulers, float64."""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler

from sdinfer.denoiser import Denoiser
from sdinfer.samplers import get_sampler, sample_loop
from sdinfer.schedules import NoiseSchedule
from test_ddim import model_fn


def _karras_float64(sched, steps):
    """diffusers keeps sigmas in float32; recompute its Karras grid in float64."""
    ac = sched.alphas_cumprod.double().numpy()
    train = np.sqrt((1 - ac) / ac)
    s_min, s_max = train[0], train[-1]
    ramp = np.linspace(0, 1, steps)
    sig = (s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    log_train = np.log(train)
    ts = np.interp(np.log(sig), log_train, np.arange(len(train)))
    return torch.tensor(sig), torch.tensor(ts)


@pytest.mark.parametrize("name,cls", [("euler", EulerDiscreteScheduler), ("heun", HeunDiscreteScheduler)])
@pytest.mark.parametrize("steps", [5, 10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_diffusers(name, cls, steps, prediction_type):
    sched = cls(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, use_karras_sigmas=True,
                prediction_type=prediction_type)
    sched.set_timesteps(steps)
    sig, ts = _karras_float64(sched, steps)
    if name == "euler":
        sched.sigmas = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])
        sched.timesteps = ts
    else:  # Heun evaluates every inner sigma twice
        sched.sigmas = torch.cat([sig[:1], sig[1:].repeat_interleave(2), torch.zeros(1, dtype=torch.float64)])
        sched.timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref = x.clone() * float((sig[0] ** 2 + 1) ** 0.5)  # diffusers' sample lives in x / alpha
    for t in sched.timesteps:
        model_in = sched.scale_model_input(ref, t)
        ref = sched.step(model_fn(model_in, t.double().expand(2)), t, ref).prev_sample
    den = Denoiser(model_fn, NoiseSchedule(sched.alphas_cumprod.double()), prediction_type)
    ours = sample_loop(den, get_sampler(name), x.clone(), steps, None, None)
    rel = float((ours - ref).norm() / ref.norm())
    assert rel <= 1e-6, rel
    assert den.nfe == (steps if name == "euler" else 2 * steps - 1)
