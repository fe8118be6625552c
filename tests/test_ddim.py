"""Our DDIM against diffusers' DDIMScheduler on the same model, float64."""

import pytest
import torch
from diffusers import DDIMScheduler

from sdinfer.denoiser import Denoiser
from sdinfer.samplers import DDIM, get_sampler, sample_loop
from sdinfer.schedules import NoiseSchedule


def model_fn(x, t, text=None):
    t = t.view(-1, 1, 1, 1).to(x.dtype)
    return 0.6 * x * torch.cos(t / 300) + 0.2 * torch.sin(x + t / 100)


def diffusers_ddim(x, steps, eta, prediction_type, seed):
    sched = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False,
                          prediction_type=prediction_type)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        out = model_fn(x, t.double().expand(x.shape[0]))
        x = sched.step(out, t, x, eta=eta, generator=g).prev_sample
    return x, sched


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 10, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(prediction_type, steps, eta):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref, sched = diffusers_ddim(x.clone(), steps, eta, prediction_type, seed=5)
    schedule = NoiseSchedule(sched.alphas_cumprod)
    den = Denoiser(model_fn, schedule, prediction_type)
    ours = sample_loop(den, DDIM(eta=eta), x.clone(), steps, None, None,
                       generator=torch.Generator().manual_seed(5))
    rel = (ours - ref).norm() / ref.norm()
    assert rel <= 1e-6, rel
    assert den.nfe == steps


def test_guidance_mixes_branches():
    schedule = NoiseSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))

    def fn(x, t, text):
        return x * 0 + text.view(-1, 1, 1, 1)

    den = Denoiser(fn, schedule, "epsilon", guidance_scale=3.0)
    from sdinfer.context import StepContext
    ctx = StepContext(0, 1, 0.5, 499.0)
    out = den.raw(torch.zeros(2, 1, 2, 2), 0.5, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.5]), ctx)
    expected = torch.tensor([0.0 + 3 * 1.0, 0.5 + 3 * 1.5])
    torch.testing.assert_close(out[:, 0, 0, 0], expected)
    assert den.nfe == 1 and den.model_calls == 1


def test_nan_from_model_is_a_clear_error():
    schedule = NoiseSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    den = Denoiser(lambda x, t, c: x * float("nan"), schedule, "epsilon")
    with pytest.raises(FloatingPointError, match="NaN"):
        sample_loop(den, DDIM(), torch.randn(1, 1, 2, 2), 3, None, None)


@pytest.mark.parametrize("spec,msg", [("euler-magic", "unknown sampler"), ("ddim:eta", "key=value"),
                                      ("ddim:eta=2", "eta"), ("ddim:order=2", "no option"),
                                      ("unipc:solver_type=bh7", "solver type"), ("ddim:eta=x", "number"),
                                      ("dpm-solver++:algorithm=foo", "algorithm"),
                                      ("dpm-solver++-singlestep:order=4", "orders 1, 2 and 3"),
                                      ("dpm-solver++-singlestep:solver_type=rk4", "solver_type"),
                                      ("dpm-solver:sde=true", "dpm-solver\\+\\+ only"),
                                      ("ddim:0-10,nope:10-20", "unknown sampler"),
                                      ("ddim:0-10;dpm-solver++:10-20", "key=value")])
def test_bad_sampler_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        get_sampler(spec)


def test_steps_below_the_solver_minimum():
    schedule = NoiseSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    den = Denoiser(lambda x, t, c: x, schedule, "epsilon")
    with pytest.raises(ValueError, match="needs at least 2 steps"):
        sample_loop(den, DDIM(min_steps=2), torch.randn(1, 1, 2, 2), 1, None, None)
