"""The calibration reference (samplers/reference.py): on the exact mixture, unguided and under
guidance 7.5, it is within a small fraction of its own tolerance of scipy's solution, where
200 steps of DPM-Solver++ (the old calibration reference) are not; it says when it does not
converge, and refuses times the model is not defined at."""

from __future__ import annotations

import pytest
import torch

import guided_mixture as gmx
from sdinfer.denoiser import Denoiser
from sdinfer.eval import gaussian_mixture as gm
from sdinfer.samplers import get_sampler, sample_loop
from sdinfer.samplers.reference import TOLERANCE, ReferenceNotConverged, solve_reference
from sdinfer.schedules import FlowMatchSchedule


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_the_reference_is_the_exact_solution_where_dpm_solver_200_steps_is_not(guidance):
    den, x_T, cond, uncond = gmx.problem(guidance, 128, 0)
    exact = gmx.exact(guidance, x_T)
    ref = solve_reference(den, x_T, cond, uncond)
    assert ref.times[-1] == 0.0 and ref.difference <= TOLERANCE
    assert ref.final.dtype == x_T.dtype and ref.final.shape == x_T.shape
    # fourth order: the returned solve is about 1/15 of its difference to the coarser one off
    assert gmx.rms(ref.final, exact) < TOLERANCE / 5
    old = sample_loop(den, get_sampler("dpm-solver++"), x_T.clone(), 200, cond, uncond)
    assert gmx.rms(old, exact) > 50 * gmx.rms(ref.final, exact)


def test_the_states_at_the_requested_times_are_the_ode_solution_there():
    sched = gm.schedule()
    den = Denoiser(gm.model_fn(sched), sched, "sample")
    x_T = torch.randn(64, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    times = [1.0, 0.6, 0.2, sched.t_min]
    ref = solve_reference(den, x_T, times=times)
    assert len(ref.states) == 4 and torch.equal(ref.states[0], x_T)
    for t, state in zip(times[1:], ref.states[1:]):
        assert gmx.rms(state, gm.reference_solution(sched, x_T, t)) < TOLERANCE / 5, t
    # from float32 noise: float32 states, float64 inside
    single = solve_reference(den, x_T.float(), times=times)
    assert single.final.dtype == torch.float32
    assert gmx.rms(single.final, ref.final) < 1e-6


def test_it_says_when_it_does_not_converge_and_refuses_bad_times():
    den, x_T, cond, uncond = gmx.problem(7.5, 8, 1)
    with pytest.raises(ReferenceNotConverged, match="did not converge.*raise max_steps or the tolerance"):
        solve_reference(den, x_T, cond, uncond, tolerance=1e-14, max_steps=400)
    with pytest.raises(ReferenceNotConverged, match="needs more than max_steps = 10"):
        solve_reference(den, x_T, cond, uncond, max_steps=10)
    rough = Denoiser(lambda x, t, text=None: gm.model_fn(gm.schedule())(x, t) + 1e-3 * torch.sin(3e3 * t).view(-1, 1, 1, 1),
                     gm.schedule(), "sample")
    with pytest.raises(ReferenceNotConverged, match="stopped converging.*not smooth enough in t"):
        solve_reference(rough, x_T)
    sched = den.schedule
    for times in ([1.0, 0.5, 0.5, 0.0], [1.0, sched.t_min / 2, 0.0], [1.5, 0.5]):
        with pytest.raises(ValueError, match="reference"):
            solve_reference(den, x_T, cond, uncond, times=times)
    flow = Denoiser(lambda x, t, text=None: x, FlowMatchSchedule(), "flow")
    with pytest.raises(ValueError, match="VP schedules"):
        solve_reference(flow, x_T)
