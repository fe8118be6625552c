"""UniPC against diffusers' UniPCMultistepScheduler, float64."""

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from sdinfer.denoiser import Denoiser
from sdinfer.samplers import sample_loop
from sdinfer.samplers.unipc import UniPC
from sdinfer.schedules import NoiseSchedule
from diffusers_reference import run_float64
from test_ddim import model_fn


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_unipc_matches_diffusers(order, steps, solver_type, prediction_type):
    # diffusers' bh1 divides by B(h) = -inf on a step to sigma = 0 (NaN), so bh1 ends at sigma_min
    final = "zero" if solver_type == "bh2" else "sigma_min"
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sched = UniPCMultistepScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                    solver_order=order, solver_type=solver_type,
                                    prediction_type=prediction_type, final_sigmas_type=final)
    ref = run_float64(sched, x.clone(), steps, final)
    den = Denoiser(model_fn, NoiseSchedule(sched.alphas_cumprod), prediction_type)
    ours = sample_loop(den, UniPC(order=order, solver_type=solver_type), x.clone(), steps, None, None,
                       timesteps=sched.timesteps.tolist(), final=final)
    rel = float((ours - ref).norm() / ref.norm())
    assert rel <= 1e-6, rel
    assert den.nfe == steps


def test_unipc_bad_options():
    with pytest.raises(ValueError, match="orders 1, 2 and 3"):
        UniPC(order=5)
    with pytest.raises(ValueError, match="solver type"):
        UniPC(solver_type="bh9")
