"""Measured convergence orders of the ODE solvers, and ParaDiGMS rounds, on the exact
Gaussian-mixture model (sdinfer.eval.gaussian_mixture).

    python bench/sampler_orders.py
"""

from __future__ import annotations

import numpy as np
import torch

from sdinfer.denoiser import Denoiser
from sdinfer.eval import gaussian_mixture as gm
from sdinfer.samplers import DDIM, get_sampler, sample_loop
from sdinfer.samplers.parallel import paradigms

STEPS = [20, 30, 40, 60, 80]
SOLVERS = ["ddim", "dpm-solver:order=2", "dpm-solver++:order=2", "dpm-solver:order=3",
           "dpm-solver++:order=3", "unipc:order=2", "unipc:order=3"]


def lambda_grid(sched, steps):
    lam = torch.linspace(float(sched.lam(1.0)), float(sched.lam(sched.t_min)), steps + 1,
                         dtype=torch.float64)
    return [float(sched.model_time(sched.inverse_lambda(v))) for v in lam[:-1]]


def main() -> None:
    sched = gm.schedule()
    x_T = torch.randn(64, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = gm.reference_solution(sched, x_T, sched.t_min)
    print("| solver | RMS error at " + " / ".join(map(str, STEPS)) + " steps | measured order |")
    print("|---|---|---|")
    for spec in SOLVERS:
        errors = []
        for steps in STEPS:
            den = Denoiser(gm.model_fn(sched), sched, "sample")
            x = sample_loop(den, get_sampler(spec + ",lower_order_final=false" if ":" in spec else spec),
                            x_T.clone(), steps, None, None, timesteps=lambda_grid(sched, steps),
                            final="sigma_min")
            errors.append(float((x - ref).square().mean().sqrt()))
        slope = -np.polyfit(np.log(STEPS), np.log(errors), 1)[0]
        print(f"| {spec} | " + " / ".join(f"{e:.2e}" for e in errors) + f" | {slope:.2f} |")

    x_T = torch.randn(32, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seq = sample_loop(Denoiser(gm.model_fn(sched), sched, "sample"), DDIM(), x_T.clone(), 100, None, None)
    print("\n| ParaDiGMS on 100-step DDIM | window | tolerance | rounds | evaluations | max abs error vs sequential |")
    print("|---|---|---|---|---|---|")
    for window in (20, 50):
        for tol in (0.1, 0.03, 0.01, 0.003):
            res = paradigms(Denoiser(gm.model_fn(sched), sched, "sample"), x_T.clone(), 100,
                            window=window, tolerance=tol)
            print(f"| | {window} | {tol} | {res.rounds} | {res.evaluations} | "
                  f"{float((res.x - seq).abs().max()):.3f} |")


if __name__ == "__main__":
    main()
