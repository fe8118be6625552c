"""Flow matching: Euler / Heun / DDIM on a FlowMatchSchedule against diffusers, float64."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

import sdinfer
from sdinfer.schedules import FlowMatchSchedule
from test_ddim import model_fn


def _diffusers(cls, steps, shift, x):
    sched = cls(shift=shift)
    sched.set_timesteps(steps)
    sched.sigmas = sched.sigmas.double()
    sched.timesteps = sched.timesteps.double()
    ref = x.clone()
    for t in sched.timesteps:
        ref = sched.step(model_fn(ref, t.expand(2)), t, ref).prev_sample
    return ref, sched


@pytest.mark.parametrize("steps", [4, 10, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_flow_euler_matches_diffusers(steps, shift, sampler):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ref, sched = _diffusers(FlowMatchEulerDiscreteScheduler, steps, shift, x)
    ours = sdinfer.sample(model_fn, x.clone(), FlowMatchSchedule(1000, shift), sampler=sampler,
                          steps=steps, prediction_type="flow", timesteps=sched.timesteps.tolist())
    assert float((ours - ref).norm() / ref.norm()) <= 1e-6


@pytest.mark.parametrize("steps", [4, 10])
def test_flow_heun_matches_diffusers(steps):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    ref, sched = _diffusers(FlowMatchHeunDiscreteScheduler, steps, 3.0, x)
    ours = sdinfer.sample(model_fn, x.clone(), FlowMatchSchedule(1000, 3.0), sampler="heun",
                          steps=steps, prediction_type="flow",
                          timesteps=sched.timesteps[::2].tolist()[:steps])
    assert float((ours - ref).norm() / ref.norm()) <= 1e-6


def test_flow_grid_is_shifted_uniform():
    from sdinfer.samplers.base import continuous_times

    s = FlowMatchSchedule(1000, 3.0)
    ts = torch.tensor(continuous_times(s, 5, "flow"), dtype=torch.float64)
    u = torch.linspace(1.0, 1e-3, 5, dtype=torch.float64)
    torch.testing.assert_close(ts, 3 * u / (1 + 2 * u))


def test_schedule_and_prediction_type_must_match():
    from sdinfer.schedules import NoiseSchedule

    vp = NoiseSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="does not fit a VP"):
        sdinfer.sample(model_fn, x, vp, prediction_type="flow")
    with pytest.raises(ValueError, match="does not fit a flow-matching"):
        sdinfer.sample(model_fn, x, FlowMatchSchedule(), prediction_type="epsilon")
    with pytest.raises(ValueError, match="does not fit a flow-matching"):
        sdinfer.sample(model_fn, x, FlowMatchSchedule(), prediction_type="flow", spacing="trailing")


def test_sample_with_diffusers_config_and_options():
    from diffusers import DDIMScheduler

    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sdinfer.sample(model_fn, x, DDIMScheduler(), sampler="dpm-solver++", steps=8, order=3)
    assert out.shape == x.shape and torch.isfinite(out).all()
