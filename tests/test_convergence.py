"""Measured convergence orders of the ODE solvers on the exact Gaussian-mixture model."""

import numpy as np
import pytest
from conftest import lambda_grid

from sdinfer.eval import gaussian_mixture as gm
from sdinfer.denoiser import Denoiser
from sdinfer.samplers import get_sampler, sample_loop

STEPS = [20, 30, 40, 60, 80]
# third-order solvers reach their asymptotic order later; multiples of 6 keep the singlestep
# solvers' blocks whole
STEPS_HIGH = [48, 72, 96, 144]


@pytest.mark.parametrize("spec,low,high,steps", [
    ("ddim", 0.7, 1.3, STEPS),
    ("dpm-solver:order=2,lower_order_final=false", 1.7, 2.3, STEPS),
    ("dpm-solver++:order=2,lower_order_final=false", 1.7, 2.3, STEPS),
    ("dpm-solver-singlestep:order=2,lower_order_final=false", 1.7, 2.3, STEPS_HIGH),
    ("dpm-solver++-2s:lower_order_final=false", 1.7, 2.3, STEPS_HIGH),
    # the corrector lifts UniPC-2 above its predictor's order (measured 2.70)
    ("unipc:order=2,lower_order_final=false", 2.5, 3.3, STEPS),
    # measured 2.87, 2.92, 3.08, 2.72, 2.77, 2.92 on STEPS_HIGH
    ("dpm-solver:order=3,lower_order_final=false", 2.7, 3.3, STEPS_HIGH),
    ("dpm-solver++-3m:lower_order_final=false", 2.7, 3.3, STEPS_HIGH),
    ("dpm-solver-singlestep:order=3,lower_order_final=false", 2.7, 3.3, STEPS_HIGH),
    ("dpm-solver++-singlestep:order=3,lower_order_final=false", 2.7, 3.3, STEPS_HIGH),
    ("dpm-solver++-singlestep:order=3,lower_order_final=false,solver_type=heun", 2.7, 3.3,
     STEPS_HIGH),
    ("unipc:order=3,lower_order_final=false,use_corrector=false", 2.7, 3.3, STEPS_HIGH),
    # UniC raises the order by one (UniPC paper, Theorem 3.2): measured 3.81
    ("unipc:order=3,lower_order_final=false", 3.5, 4.3, STEPS_HIGH),
])
def test_convergence_order(gm_problem, spec, low, high, steps):
    slope = _measured_order(gm_problem, spec, steps)
    assert low <= slope <= high, (spec, slope)


def test_diffusers_third_order_multistep_is_second_order(gm_problem):
    """diffusers' DPMSolverMultistep 3M weighs its D2 term by half (dpm_solver.py), which
    caps it at second order; ours with the exact weight measures 2.92 on the same grid."""
    theirs = _measured_order(gm_problem, "dpm-solver++-3m:lower_order_final=false,match_diffusers=true",
                             STEPS_HIGH)
    ours = _measured_order(gm_problem, "dpm-solver++-3m:lower_order_final=false", STEPS_HIGH)
    assert theirs < 2.4 < 2.7 < ours, (theirs, ours)


def _measured_order(problem, spec, steps_list):
    sched, x_T, ref = problem
    errors = []
    for steps in steps_list:
        den = Denoiser(gm.model_fn(sched), sched, "sample")
        x = sample_loop(den, get_sampler(spec), x_T.clone(), steps, None, None,
                        timesteps=lambda_grid(sched, steps), final="sigma_min")
        errors.append(float((x - ref).square().mean().sqrt()))
    return -np.polyfit(np.log(steps_list), np.log(errors), 1)[0]
