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
