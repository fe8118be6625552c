"""DPM-Solver / DPM-Solver++ multistep against diffusers' DPMSolverMultistepScheduler, float64."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from sdinfer.denoiser import Denoiser
from sdinfer.samplers import get_sampler, sample_loop
from sdinfer.schedules import NoiseSchedule
from diffusers_reference import run_float64
from test_ddim import model_fn


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_diffusers(algorithm, order, steps, prediction_type):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    final = "zero" if algorithm == "dpmsolver++" else "sigma_min"  # diffusers' only choice for dpmsolver
    sched = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                        solver_order=order, algorithm_type=algorithm,
                                        prediction_type=prediction_type, final_sigmas_type=final)
    ref = run_float64(sched, x.clone(), steps, final)
    name = "dpm-solver++" if algorithm == "dpmsolver++" else "dpm-solver"
    den = Denoiser(model_fn, NoiseSchedule(sched.alphas_cumprod), prediction_type)
    ours = sample_loop(den, get_sampler(f"{name}:order={order},match_diffusers=true"), x.clone(), steps, None, None,
                       timesteps=sched.timesteps.tolist(), final=final)
    rel = float((ours - ref).norm() / ref.norm())
    assert rel <= 1e-6, rel
    assert den.nfe == steps


def test_bad_order():
    with pytest.raises(ValueError, match="orders 1, 2 and 3"):
        get_sampler("dpm-solver++:order=4")
