"""Singlestep DPM-Solver / DPM-Solver++ against diffusers' DPMSolverSinglestepScheduler,
SDE-DPM-Solver++ against diffusers' sde-dpmsolver++, and the adaptive DPM-Solver-12/23."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler

from sdinfer.denoiser import Denoiser
from sdinfer.eval import gaussian_mixture as gm
from sdinfer.samplers import get_sampler, sample_loop
from sdinfer.samplers.dpm_solver_singlestep import dpm_solver_adaptive, order_list
from sdinfer.schedules import NoiseSchedule
from diffusers_reference import run_float64
from test_ddim import model_fn


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("steps", [6, 12, 13])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_diffusers(algorithm, order, solver_type, steps, prediction_type):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    final = "zero" if algorithm == "dpmsolver++" else "sigma_min"
    sched = DPMSolverSinglestepScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                         solver_order=order, algorithm_type=algorithm,
                                         solver_type=solver_type, lower_order_final=True,
                                         prediction_type=prediction_type, final_sigmas_type=final)
    ref = run_float64(sched, x.clone(), steps, final)
    name = "dpm-solver++-singlestep" if algorithm == "dpmsolver++" else "dpm-solver-singlestep"
    den = Denoiser(model_fn, NoiseSchedule(sched.alphas_cumprod), prediction_type)
    ours = sample_loop(den, get_sampler(f"{name}:order={order},solver_type={solver_type}"),
                       x.clone(), steps, None, None, timesteps=sched.timesteps.tolist(), final=final)
    rel = float((ours - ref).norm() / ref.norm())
    assert rel <= 1e-6, rel
    assert den.nfe == steps


def test_order_list_matches_diffusers():
    for order in (1, 2, 3):
        for steps in range(1, 20):
            sched = DPMSolverSinglestepScheduler(solver_order=order, lower_order_final=True,
                                                 final_sigmas_type="sigma_min")
            assert order_list(steps, order) == sched.get_order_list(steps), (order, steps)


@pytest.mark.parametrize("steps", [5, 12])
def test_sde_dpm_solver_2m_matches_diffusers_with_the_same_noise(steps):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sched = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                        solver_order=2, algorithm_type="sde-dpmsolver++")
    noises = torch.randn(steps, *x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.set_timesteps(steps)
    ref = x.clone()
    for i, t in enumerate(sched.timesteps):
        ref = sched.step(model_fn(ref, t.double().expand(2)), t, ref,
                         variance_noise=noises[i]).prev_sample.double()
    den = Denoiser(model_fn, NoiseSchedule(sched.alphas_cumprod), "epsilon")
    ours = sample_loop(den, get_sampler("dpm-solver++-sde"), x.clone(), steps, None, None,
                       timesteps=sched.timesteps.tolist(),
                       generator=torch.Generator().manual_seed(3))
    rel = float((ours - ref).norm() / ref.norm())
    assert rel <= 1e-5, rel  # diffusers steps in float32


def test_sde_needs_the_data_prediction():
    with pytest.raises(ValueError, match="dpm-solver\\+\\+ only"):
        get_sampler("dpm-solver:sde=true")


@pytest.mark.parametrize("order", [2, 3])
def test_adaptive_dpm_solver_meets_its_tolerance_on_the_mixture(order):
    sched = gm.schedule()
    x_T = torch.randn(64, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = gm.reference_solution(sched, x_T, sched.t_min)
    errors, nfes = [], []
    for rtol in (0.05, 0.005):
        den = Denoiser(gm.model_fn(sched), sched, "sample")
        res = dpm_solver_adaptive(den, x_T.clone(), order=order, rtol=rtol, atol=rtol / 10,
                                  denoise_final=False)
        assert den.nfe == res.nfe and res.accepted > 0
        errors.append(float((res.x - ref).square().mean().sqrt()))
        nfes.append(res.nfe)
    assert errors[1] < errors[0] / 3, errors  # a tighter tolerance buys accuracy...
    assert nfes[1] > nfes[0], nfes            # ...with more evaluations
    assert errors[0] < 0.05, errors


def test_adaptive_bad_input():
    den = Denoiser(gm.model_fn(gm.schedule()), gm.schedule(), "sample")
    with pytest.raises(ValueError, match="orders 2"):
        dpm_solver_adaptive(den, torch.zeros(1, 2, 1, 1, dtype=torch.float64), order=4)
    with pytest.raises(ValueError, match="rtol"):
        dpm_solver_adaptive(den, torch.zeros(1, 2, 1, 1, dtype=torch.float64), rtol=0)


def test_adaptive_through_sdinfer_sample():
    import sdinfer

    sched = gm.schedule()
    x_T = torch.randn(8, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = sdinfer.sample(gm.model_fn(sched), x_T.clone(), sched, sampler="dpm-solver++:order=3",
                         steps=200, prediction_type="sample")
    x = sdinfer.sample(gm.model_fn(sched), x_T.clone(), sched, sampler="dpm-solver-adaptive",
                       prediction_type="sample", order=3, rtol=0.005, atol=0.0005)
    assert float((x - ref).abs().max()) < 0.02
