"""Measured convergence orders of the ODE solvers, and ParaDiGMS / ParaTAA rounds, on the exact
Gaussian-mixture model (sdinfer.eval.gaussian_mixture).

    python bench/sampler_orders.py
"""

from __future__ import annotations

import numpy as np
import torch

from sdinfer.denoiser import Denoiser
from sdinfer.eval import gaussian_mixture as gm
from sdinfer.samplers import DDIM, get_sampler, sample_loop
from sdinfer.samplers.paradigms import paradigms
from sdinfer.samplers.parataa import parataa

STEPS = [20, 30, 40, 60, 80]
SOLVERS = ["ddim", "dpm-solver:order=2", "dpm-solver++:order=2", "dpm-solver:order=3",
           "dpm-solver++:order=3", "dpm-solver++:order=3,match_diffusers=true",
           "dpm-solver++-2s", "dpm-solver-singlestep:order=3", "unipc:order=2", "unipc:order=3"]
STEPS_HIGH = [48, 72, 96, 144]


def lambda_grid(sched, steps):
    lam = torch.linspace(float(sched.lam(1.0)), float(sched.lam(sched.t_min)), steps + 1,
                         dtype=torch.float64)
    return [float(sched.model_time(sched.inverse_lambda(v))) for v in lam[:-1]]


def main() -> None:
    sched = gm.schedule()
    x_T = torch.randn(64, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = gm.reference_solution(sched, x_T, sched.t_min)
    print("| solver | RMS error at steps | measured order |")
    print("|---|---|---|")
    for spec in SOLVERS:
        errors = []
        steps_list = STEPS if spec in ("ddim",) or "order=2" in spec else STEPS_HIGH
        for steps in steps_list:
            den = Denoiser(gm.model_fn(sched), sched, "sample")
            x = sample_loop(den, get_sampler(spec + ",lower_order_final=false" if ":" in spec else spec),
                            x_T.clone(), steps, None, None, timesteps=lambda_grid(sched, steps),
                            final="sigma_min")
            errors.append(float((x - ref).square().mean().sqrt()))
        slope = -np.polyfit(np.log(steps_list), np.log(errors), 1)[0]
        print(f"| {spec} | " + " / ".join(f"{n}: {e:.2e}" for n, e in zip(steps_list, errors))
              + f" | {slope:.2f} |")

    x_T = torch.randn(32, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seq = sample_loop(Denoiser(gm.model_fn(sched), sched, "sample"), DDIM(), x_T.clone(), 100, None, None)
    print("\n| 100-step DDIM in parallel | window | tolerance | rounds | evaluations | max abs error vs sequential |")
    print("|---|---|---|---|---|---|")
    for window in (20, 50, 100):
        for tol in (0.1, 0.03, 0.01, 0.003):
            res = paradigms(Denoiser(gm.model_fn(sched), sched, "sample"), x_T.clone(), 100,
                            window=window, tolerance=tol)
            print(f"| ParaDiGMS | {window} | {tol} | {res.rounds} | {res.evaluations} | "
                  f"{float((res.x - seq).abs().max()):.1e} |")
    for memory in (0, 1, 2):
        for tol in (0.1, 0.03, 0.01):
            res = parataa(Denoiser(gm.model_fn(sched), sched, "sample"), x_T.clone(), 100,
                          tolerance=tol, memory=memory)
            print(f"| ParaTAA memory {memory} | 100 | {tol} | {res.rounds} | {res.evaluations} | "
                  f"{float((res.x - seq).abs().max()):.1e} |")


if __name__ == "__main__":
    main()
