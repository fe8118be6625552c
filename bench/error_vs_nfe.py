"""Error against NFE of every sampler, ours and diffusers', on the exact Gaussian mixture.

    python bench/error_vs_nfe.py [--plot docs/error_vs_nfe_gm.png]
    python bench/error_vs_nfe.py --model unet [--plot ...]     # a default model, 8 prompts, cfg 4

Each sampler runs from the same 256 noise samples with NFE in {5, 6, 8, 10, 12, 15, 20, 25,
50} (two-evaluation steps use (NFE + 1) // 2 steps); the error is the RMS distance of its
final sample to a 1000-step DPM-Solver++(3M) reference from the same noise (which agrees with
the scipy solution of the probability-flow ODE to 1e-7).  Our samplers run on each of their
grids (trailing, leading, linspace, logsnr, karras, time_uniform, time_quadratic, and gits: the
optimal grid of GITS, calibrated on other noise -- on a default model the grid it ships), and
DDIM, DPM-Solver++(2M) and DPM-Solver-v3 on their learned grids (``samplers/learned_grid.py``: learned on
other noise; on a default model those in its learned-grid file, learned on other prompts
and noise, NaN where it has none); rows ``[trailing, sigma_min]`` end at the first training step
instead of clean data (``final="sigma_min"``, as diffusers' DDIM does and its multistep
schedulers' ``final_sigmas_type="sigma_min"``, whose rows are here too);
DPM-Solver-v3 on statistics from other noise (a default model's shipped ones); rows marked
+afs take the analytic first step (one step more for the same NFE).  Diffusers' schedulers
with their own defaults and their Karras / uniform-lambda ("lu_lambdas") options where they
have them.  The last rows give the best of each side per NFE.  A second table gives the
adaptive DPM-Solver-12 / -23 (their own steps) at several tolerances: NFE used and error.

    python bench/error_vs_nfe.py --model unet --prompts 64 --heldout --nfes 6

checks one column on 64 held-out prompts (noise seeds 10000+) instead of the 8 quick ones.

    python bench/error_vs_nfe.py --model unet --only 'leading|linspace|afs' --merge OLD.md

runs only the rows whose names match and keeps the other rows of an earlier run's table
(every row is deterministic: same prompts, noise and code give the same numbers).
"""

from __future__ import annotations

import argparse
import re
import warnings

import torch

from sdinfer.denoiser import Denoiser
from sdinfer.errors import UserError
from sdinfer.eval import gaussian_mixture as gm
from sdinfer.samplers import get_sampler, sample_loop
from sdinfer.samplers.dpm_solver_singlestep import dpm_solver_adaptive

NFES = [5, 6, 8, 10, 12, 15, 20, 25, 50]
OURS = ["ddim", "dpm-solver++-2m", "dpm-solver++-3m", "dpm-solver:order=3",
        "dpm-solver++-2s", "dpm-solver++-singlestep:order=3", "dpm-solver-singlestep:order=3",
        "unipc:order=2", "unipc:order=3", "euler", "heun", "plms",
        "dpm-solver-v3", "dpm-solver-v3:use_corrector=true", "dpm-solver-v3:use_corrector=half",
        "dpm-solver-v3:use_corrector=false"]
GRIDS = ["trailing", "leading", "linspace", "logsnr", "karras", "time_uniform", "time_quadratic", "gits"]
# run again with the analytic first step (one evaluation saved: NFE + 1 steps for NFE evaluations)
WITH_AFS = ["ddim", "dpm-solver++-2m", "unipc:order=2", "dpm-solver-v3"]
# also on their learned grids (a default model's learned-grid file, NaN where it has none; on the mixture learned here)
LEARNED = ["ddim", "dpm-solver++-2m", "dpm-solver-v3"]
# also ending at the first training step instead of clean data (``final="sigma_min"``, diffusers'
# ``final_sigmas_type``; diffusers' DDIM always ends there), on the trailing grid (the leading
# and linspace grids end at timestep 0 already)
FINAL_SIGMA_MIN = ["ddim", "dpm-solver++-2m", "dpm-solver++-3m", "unipc:order=2", "dpm-solver-v3",
                   "dpm-solver-v3:use_corrector=false", "dpm-solver-v3:use_corrector=half"]
# DPM-Solver-12 / -23 (order, rtol): they choose their own steps, so they get a table of their own
ADAPTIVE = [(2, 0.2), (2, 0.1), (2, 0.05), (3, 0.2), (3, 0.1), (3, 0.05)]
TWO_EVALUATIONS = {"heun"}
ONE_EXTRA_EVALUATION = {"plms"}  # its first step evaluates twice


def _diffusers_schedulers(prediction_type: str = "epsilon"):
    from diffusers import (DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                           DPMSolverSinglestepScheduler, EulerDiscreteScheduler,
                           HeunDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler,
                           UniPCMultistepScheduler)
    base = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type=prediction_type)
    return {
        "DDIM": lambda: DDIMScheduler(**base, clip_sample=False, timestep_spacing="trailing"),
        "DDIM leading": lambda: DDIMScheduler(**base, clip_sample=False),
        "DPMSolverMultistep 2M": lambda: DPMSolverMultistepScheduler(**base),
        "DPMSolverMultistep 3M": lambda: DPMSolverMultistepScheduler(**base, solver_order=3),
        "DPMSolverMultistep 2M karras": lambda: DPMSolverMultistepScheduler(**base, use_karras_sigmas=True),
        "DPMSolverMultistep 2M lu_lambdas": lambda: DPMSolverMultistepScheduler(**base, use_lu_lambdas=True),
        "DPMSolverMultistep 3M lu_lambdas": lambda: DPMSolverMultistepScheduler(**base, solver_order=3,
                                                                                use_lu_lambdas=True),
        "DPMSolverMultistep 2M sigma_min": lambda: DPMSolverMultistepScheduler(**base, final_sigmas_type="sigma_min"),
        "DPMSolverMultistep 3M sigma_min": lambda: DPMSolverMultistepScheduler(**base, solver_order=3,
                                                                               final_sigmas_type="sigma_min"),
        "DPMSolverSinglestep 2": lambda: DPMSolverSinglestepScheduler(**base, lower_order_final=True),
        "DPMSolverSinglestep 3": lambda: DPMSolverSinglestepScheduler(**base, solver_order=3,
                                                                      lower_order_final=True),
        "UniPCMultistep bh2": lambda: UniPCMultistepScheduler(**base),
        "UniPCMultistep bh2 sigma_min": lambda: UniPCMultistepScheduler(**base, final_sigmas_type="sigma_min"),
        "UniPCMultistep 3": lambda: UniPCMultistepScheduler(**base, solver_order=3),
        "UniPCMultistep 3 karras": lambda: UniPCMultistepScheduler(**base, solver_order=3,
                                                                   use_karras_sigmas=True),
        "DEISMultistep": lambda: DEISMultistepScheduler(**base),
        "EulerDiscrete": lambda: EulerDiscreteScheduler(**base, timestep_spacing="trailing"),
        "EulerDiscrete karras": lambda: EulerDiscreteScheduler(**base, use_karras_sigmas=True),
        "HeunDiscrete": lambda: HeunDiscreteScheduler(**base),
        "HeunDiscrete karras": lambda: HeunDiscreteScheduler(**base, use_karras_sigmas=True),
        "LMSDiscrete": lambda: LMSDiscreteScheduler(**base),
        "PNDM": lambda: PNDMScheduler(**base, skip_prk_steps=True),
    }


def epsilon_model(sched):
    """The mixture's exact denoiser as an epsilon predictor in diffusers' timestep units."""
    x0_model = gm.model_fn(sched)

    def fn(x, model_t, text=None):
        t = sched.continuous_time(float(model_t.reshape(-1)[0]))
        a, s = sched.alpha(t), sched.sigma(t)
        return (x - a * x0_model(x, model_t.reshape(-1).expand(x.shape[0]))) / s
    return fn


def steps_for(spec: str, nfe: int, afs: bool = False) -> int:
    steps = (nfe + 1) // 2 if spec in TWO_EVALUATIONS else nfe - 1 if spec in ONE_EXTRA_EVALUATION else nfe
    return steps + 1 if afs else steps


def our_rows(only: str | None):
    """(row name, sampler spec, grid, analytic first step, final time) of every row of ours to run."""
    rows = [(f"sdinfer {spec} [{grid}]", spec, grid, False, "zero") for spec in OURS for grid in GRIDS]
    rows += [(f"sdinfer {spec}+afs [{grid}]", spec, grid, True, "zero") for spec in WITH_AFS for grid in GRIDS]
    rows += [(f"sdinfer {spec} [learned]", spec, "learned", False, "zero") for spec in LEARNED]
    rows += [(f"sdinfer {spec} [trailing, sigma_min]", spec, "trailing", False, "sigma_min")
             for spec in FINAL_SIGMA_MIN]
    return [r for r in rows if only is None or re.search(only, r[0])]


def read_table(path: str) -> dict[str, list[float]]:
    """The rows of an earlier run's table (to merge a partial run into)."""
    table = {}
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == len(NFES) + 1 and not cells[0].startswith(("**", "best", "sampler")):
            table[cells[0]] = [float(c) for c in cells[1:]]
    return table


def mixture_aids(sched):
    """DPM-Solver-v3 statistics (512 trajectories) and a GITS grid (256), on calibration noise."""
    from sdinfer.calibrate import compute_ems
    from sdinfer.samplers.optimal_grid import compute_grid

    den = Denoiser(gm.model_fn(sched), sched, "sample")
    x_cal = torch.randn(512, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ems = compute_ems(den, x_cal, None, None, points=200, generator=torch.Generator().manual_seed(1))
    return ems, compute_grid(den, x_cal[:256], None, None, points=60)


def mixture_learned_grid(sched, spec: str, nfe: int, gits, stats) -> object:
    """``spec``'s grid for ``nfe`` evaluations learned on the mixture (256 calibration samples)."""
    from sdinfer.samplers.base import ExplicitGrid, continuous_grid
    from sdinfer.samplers.learned_grid import learn_grid

    den = Denoiser(gm.model_fn(sched), sched, "sample")
    x_cal = torch.randn(256, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    teacher = sample_loop(den, get_sampler("dpm-solver++-3m"), x_cal.clone(), 400, None, None, spacing="logsnr")
    steps = steps_for(spec, nfe)

    def error(times):
        out = sample_loop(den, solver(spec, stats), x_cal.clone(), steps, None, None, spacing=ExplicitGrid(times))
        return float((out - teacher).square().mean().sqrt())

    spacings = {**{g: g for g in GRIDS if g not in ("gits", "leading", "linspace")}, "gits": gits}
    times, _ = learn_grid(error, {k: continuous_grid(den, steps, v) for k, v in spacings.items()},
                          min_time=sched.t_min)
    return ExplicitGrid(times, "learned")


def solver(spec: str, stats=None):
    s = get_sampler(spec)
    if spec.startswith("dpm-solver-v3") and stats is not None:
        s.stats = stats
    return s


def run_ours(spec, grid, nfe, sched, x_T, stats=None, afs=False, final="zero"):
    den = Denoiser(gm.model_fn(sched), sched, "sample")
    x = sample_loop(den, solver(spec, stats), x_T.clone(), steps_for(spec, nfe, afs), None, None, spacing=grid,
                    analytic_first_step=afs, final=final)
    return x, den.nfe


def run_diffusers(make, nfe, sched, x_T):
    scheduler = make()
    model = epsilon_model(sched)
    steps = nfe
    scheduler.set_timesteps(steps)
    if len(scheduler.timesteps) > nfe:  # two evaluations per step (Heun)
        steps = (nfe + 1) // 2
        scheduler = make()
        scheduler.set_timesteps(steps)
    x = x_T.clone() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t.reshape(1).double())
        x = scheduler.step(out, t, x).prev_sample
    return x.double(), len(scheduler.timesteps)


def model_problem(name: str, prompts: int, heldout: bool = False):
    """A default model with guidance 4 on the quick prompts (noise seeds 0, 1, ...) or the
    held-out ones (seeds 10000, 10001, ..., as bench/dpm_solver_v3.py): the pipeline, text, noise."""
    from sdinfer.cli import _quiet_libraries
    from sdinfer.eval.prompts import QUICK
    from sdinfer.models.default import shapes
    from sdinfer.pipeline import Pipeline

    _quiet_libraries()
    pipe = Pipeline.from_pretrained(name)
    texts = shapes.heldout_prompts()[:prompts] if heldout else (QUICK * 4)[:prompts]
    cond, uncond = pipe.encode(texts), pipe.encode([""] * len(texts))
    x_T = pipe.noise([(10_000 if heldout else 0) + i for i in range(len(texts))], pipe.model.native_size)
    return pipe, cond, uncond, x_T


def run_model(pipe, cond, uncond, x_T, sampler, steps, grid=None, afs=False, final="zero"):
    from sdinfer.samplers.base import sample_loop as loop
    den = pipe.denoiser(4.0)
    pipe.attach_statistics(sampler, 4.0)
    with torch.no_grad():
        x = loop(den, sampler, x_T.clone(), steps, cond, uncond, spacing=grid, analytic_first_step=afs, final=final)
    return x, den.nfe


def print_adaptive(adaptive, rmse, ours_best, theirs_best) -> None:
    """DPM-Solver-12 / -23 choose their own steps: each tolerance's NFE and error, beside the
    best fixed-step errors at the largest NFE of the main table that it does not exceed."""
    print("\n| adaptive sampler | NFE | error | best sdinfer at NFE <= it | best diffusers at NFE <= it |")
    print("|---|---|---|---|---|")
    for order, rtol in ADAPTIVE:
        res = adaptive(order, rtol)
        below = [i for i, n in enumerate(NFES) if n <= res.nfe]
        fixed = [f"{best[below[-1]]:.2e} (NFE {NFES[below[-1]]})" if below else "-" for best in (ours_best, theirs_best)]
        print(f"| DPM-Solver-{'12' if order == 2 else '23'} rtol={rtol} | {res.nfe} | {rmse(res.x):.2e} | "
              f"{fixed[0]} | {fixed[1]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--model", default=None, help="unet or dit: a default model instead of the mixture")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--heldout", action="store_true",
                        help="the held-out prompts with noise seeds 10000+ instead of the quick prompts")
    parser.add_argument("--nfes", default=None, help="comma-separated NFE columns (default: 5,6,8,10,12,15,20,25,50)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", default=None, help="run only the rows whose name matches this regex")
    parser.add_argument("--merge", default=None,
                        help="an earlier run's table: its rows are kept where this run has none")
    args = parser.parse_args()
    global NFES
    if args.nfes:
        if args.merge:
            parser.error("--merge keeps an earlier table's columns: not with --nfes")
        NFES = [int(n) for n in args.nfes.split(",")]
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: dict[str, list[float]] = {}
    theirs: dict[str, list[float]] = {}
    if args.model:
        from sdinfer.samplers.diffusers_scheduler import DiffusersSampler
        pipe, cond, uncond, x_T = model_problem(args.model, args.prompts, args.heldout)
        ref, _ = run_model(pipe, cond, uncond, x_T, get_sampler("ddim"), 1000)

        def rmse(x):
            return float((x - ref).square().mean().sqrt())

        grids = {g: pipe.time_grid(g, 4.0, max(NFES) + 1) for g in GRIDS}

        def adaptive(order, rtol):
            with torch.no_grad():
                return dpm_solver_adaptive(pipe.denoiser(4.0), x_T.clone(), cond, uncond, order=order, rtol=rtol)

        for name, spec, grid, afs, final in our_rows(args.only):
            errors = []
            for nfe in NFES:
                steps = steps_for(spec, nfe, afs)
                try:
                    spacing = pipe.time_grid(grid, 4.0, steps, spec) if grid == "learned" else grids[grid]
                except UserError:  # no grid learned for this step count
                    errors.append(float("nan"))
                    continue
                x, used = run_model(pipe, cond, uncond, x_T, get_sampler(spec), steps, spacing, afs, final)
                errors.append(rmse(x) if used <= nfe else float("nan"))
            rows[name] = errors
        for name, make in _diffusers_schedulers(pipe.model.prediction_type).items():
            if args.only and not re.search(args.only, f"diffusers {name}"):
                continue
            errors = []
            for nfe in NFES:
                try:
                    x, used = run_model(pipe, cond, uncond, x_T, DiffusersSampler(make()), nfe)
                    errors.append(rmse(x) if used <= nfe else float("nan"))
                except ValueError:  # two model calls per step: not through our loop
                    errors.append(float("nan"))
            theirs[f"diffusers {name}"] = errors
    else:
        sched = gm.schedule()
        x_T = torch.randn(args.samples, 2, 1, 1, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0))
        ref, _ = run_ours("dpm-solver++-3m", "logsnr", 1000, sched, x_T)
        stats, gits = mixture_aids(sched)
        grids = {**{g: g for g in GRIDS}, "gits": gits}

        def adaptive(order, rtol):
            return dpm_solver_adaptive(Denoiser(gm.model_fn(sched), sched, "sample"), x_T.clone(),
                                       order=order, rtol=rtol, atol=rtol / 10)

        def rmse(x):
            return float((x - ref).square().mean().sqrt())

        for name, spec, grid, afs, final in our_rows(args.only):
            errors = []
            for nfe in NFES:
                spacing = mixture_learned_grid(sched, spec, nfe, gits, stats) if grid == "learned" else grids[grid]
                x, used = run_ours(spec, spacing, nfe, sched, x_T, stats, afs, final)
                errors.append(rmse(x) if used <= nfe else float("nan"))
            rows[name] = errors
        for name, make in _diffusers_schedulers().items():
            if args.only and not re.search(args.only, f"diffusers {name}"):
                continue
            errors = []
            for nfe in NFES:
                x, used = run_diffusers(make, nfe, sched, x_T.float() if "PNDM" in name else x_T)
                errors.append(rmse(x) if used <= nfe else float("nan"))
            theirs[f"diffusers {name}"] = errors

    if args.merge:
        for name, errors in read_table(args.merge).items():
            (rows if name.startswith("sdinfer") else theirs).setdefault(name, errors)
        order = [r[0] for r in our_rows(None)]
        rows = dict(sorted(rows.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))

    def best(table):
        return [min((v[i] for v in table.values() if v[i] == v[i]), default=float("nan"))
                for i in range(len(NFES))]

    print("| sampler | " + " | ".join(f"NFE {n}" for n in NFES) + " |")
    print("|---|" + "---|" * len(NFES))
    for name, errors in {**rows, **theirs}.items():
        print(f"| {name} | " + " | ".join(f"{e:.2e}" for e in errors) + " |")
    ours_best, theirs_best = best(rows), best(theirs)
    print("| **best sdinfer** | " + " | ".join(f"**{e:.2e}**" for e in ours_best) + " |")
    print("| **best diffusers** | " + " | ".join(f"**{e:.2e}**" for e in theirs_best) + " |")
    print("| best sdinfer / best diffusers | " +
          " | ".join(f"{a / b:.2f}" for a, b in zip(ours_best, theirs_best)) + " |")
    if args.only is None or re.search(args.only, "adaptive"):
        print_adaptive(adaptive, rmse, ours_best, theirs_best)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(9, 6))
        for name, errors in rows.items():
            if name.endswith("[gits]"):
                ax.plot(NFES, errors, "-o", ms=3, lw=0.8, label=name)
        for name, errors in theirs.items():
            ax.plot(NFES, errors, "--x", ms=3, lw=0.8, label=name)
        ax.plot(NFES, ours_best, "-", color="black", lw=2.5, label="best sdinfer (any grid)")
        ax.plot(NFES, theirs_best, "--", color="red", lw=2.5, label="best diffusers")
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("NFE"), ax.set_ylabel("RMS error vs 1000-step reference")
        ax.set_title(f"{args.model or 'Gaussian mixture'}: error against NFE (sdinfer on its gits grid)")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
