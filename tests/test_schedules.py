import pytest
import torch
from diffusers import DDPMScheduler

from sdinfer.schedules import NoiseSchedule


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_from_diffusers_config_matches_diffusers(kind):
    sched = DDPMScheduler(beta_schedule=kind, beta_start=0.00085, beta_end=0.012)
    ours = NoiseSchedule.from_diffusers_config(sched.config)
    torch.testing.assert_close(ours.alphas_cumprod, sched.alphas_cumprod.double(), rtol=1e-6, atol=1e-12)


def test_continuous_time_hits_training_steps():
    s = NoiseSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    for n in (0, 1, 500, 999):
        t = s.continuous_time(n)
        assert float(s.model_time(t)) == pytest.approx(n)
        assert float(s.alpha(t) ** 2) == pytest.approx(float(s.alphas_cumprod[n]), rel=1e-12)
    assert float(s.alpha(0.0)) == 1.0 and float(s.sigma(0.0)) == 0.0


def test_alpha_sigma_lambda_consistent_and_inverse():
    s = NoiseSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    t = torch.linspace(s.t_min, 1.0, 57, dtype=torch.float64)
    torch.testing.assert_close(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones_like(t))
    torch.testing.assert_close(s.lam(t), torch.log(s.alpha(t) / s.sigma(t)))
    torch.testing.assert_close(s.inverse_lambda(s.lam(t)), t, rtol=1e-9, atol=1e-9)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="decrease"):
        NoiseSchedule(torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_diffusers_config({"beta_schedule": "zigzag"})


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace", "karras", "logsnr",
                                     "time_uniform", "time_quadratic"])
@pytest.mark.parametrize("steps", [1, 2, 10, 37])
def test_grids_decrease_to_clean_data(spacing, steps):
    from sdinfer.denoiser import Denoiser
    from sdinfer.samplers import continuous_grid

    s = NoiseSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    times = continuous_grid(Denoiser(lambda *a: None, s, "epsilon"), steps, spacing)
    assert len(times) == steps + 1 and times[-1] == 0.0
    assert all(a > b for a, b in zip(times, times[1:]))
    assert times[0] <= 1.0 and times[-2] >= s.t_min - 1e-12


def test_karras_grid_is_karras():
    from sdinfer.samplers.base import continuous_times

    s = NoiseSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    sig = torch.exp(-s.lam(torch.tensor(continuous_times(s, 10, "karras"), dtype=torch.float64)))
    ramp = torch.linspace(0, 1, 10, dtype=torch.float64)
    s_max, s_min = sig[0], sig[-1]
    expected = (s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    torch.testing.assert_close(sig, expected)


def test_bad_grid_names():
    from sdinfer.denoiser import Denoiser
    from sdinfer.samplers import continuous_grid

    s = NoiseSchedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    den = Denoiser(lambda *a: None, s, "epsilon")
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        continuous_grid(den, 5, "fibonacci")
    with pytest.raises(ValueError, match="unknown final"):
        continuous_grid(den, 5, "trailing", final="never")
