"""DPM-Solver / DPM-Solver++ multistep against diffusers' DPMSolverMultistepScheduler, float64."""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from sdinfer.denoiser import Denoiser
from sdinfer.samplers import get_sampler, sample_loop
from sdinfer.schedules import NoiseSchedule
from test_ddim import model_fn


def diffusers_run(x, steps, order, algorithm, prediction_type, final):
    sched = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                        solver_order=order, algorithm_type=algorithm,
                                        prediction_type=prediction_type, final_sigmas_type=final)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod.numpy()
    sig = np.sqrt((1 - ac) / ac)
    last = 0.0 if final == "zero" else sig[0]
    sched.sigmas = torch.tensor(np.concatenate([sig[sched.timesteps.numpy()], [last]]), dtype=torch.float64)
    for t in sched.timesteps:
        out = model_fn(x, t.double().expand(x.shape[0]))
        x = sched.step(out, t, x).prev_sample
    return x, sched


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_diffusers(algorithm, order, steps, prediction_type):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    final = "zero" if algorithm == "dpmsolver++" else "sigma_min"  # diffusers' only choice for dpmsolver
    ref, sched = diffusers_run(x.clone(), steps, order, algorithm, prediction_type, final)
    name = "dpm-solver++" if algorithm == "dpmsolver++" else "dpm-solver"
    den = Denoiser(model_fn, NoiseSchedule(sched.alphas_cumprod), prediction_type)
    ours = sample_loop(den, get_sampler(f"{name}:order={order}"), x.clone(), steps, None, None,
                       timesteps=sched.timesteps.tolist(), final=final)
    rel = float((ours - ref).norm() / ref.norm())
    assert rel <= 1e-6, rel
    assert den.nfe == steps


def test_bad_order():
    with pytest.raises(ValueError, match="orders 1, 2 and 3"):
        get_sampler("dpm-solver++:order=4")
