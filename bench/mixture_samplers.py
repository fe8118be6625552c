"""``sampler="auto"`` against the best public sampler on the exact guided and unguided mixtures.

    python bench/mixture_samplers.py             # writes bench/results/mixture-samplers.json
    python bench/mixture_samplers.py --quick     # 3 NFEs, fewer trajectories and peers (a smoke run)

For each problem of ``eval/gaussian_mixture.PROBLEMS`` (the image-like 3x8x8 and the 64-d
class-conditional mixtures, unguided and under guidance 5, 7.5 and 10):

1. calibration noise (seeds of its own): DPM-Solver-v3's statistics (``compute_ems``), GITS's
   grid (``compute_grid``) and, for the candidates on learned grids, their grids at each NFE
   (``learn_grid``, LD3's objective against the exact ends, the trimmed error), the library's own
   functions;
2. validation noise: every candidate of ``auto_sampler.DEFAULT_CANDIDATES`` at NFE 5-20 against
   the exact ODE solution (``GuidedMixture.reference``); ``auto_sampler.choose`` keeps per NFE the
   lowest trimmed error (the worst 5% of trajectories left out), the table ``sampler="auto"`` runs;
3. evaluation noise (other seeds): ``sdinfer.sample(..., sampler="auto", auto=table)`` and every
   public sampler: diffusers' schedulers (DDIM, DPMSolverMultistep / Singlestep, UniPC, DEIS,
   Euler, Heun, LMS with their Karras / exponential / lambda-uniform / trailing options) and
   k-diffusion's samplers (Euler, Heun, DPM-2, LMS, DPM++ 2S / 2M / 3M with eta 0, DPM-fast) on its
   Karras, exponential and polyexponential grids and the model's own discrete sigmas, each at the
   most steps that cost at most the NFE.  The best public sampler is chosen per NFE on the
   evaluation noise itself (an advantage the auto path does not have).

Errors per trajectory are the RMS distance of its end to the exact one; the table's statistic is
the one the choice uses (root of the trimmed mean of squared errors over the same share), and the
JSON also holds the RMS over all trajectories and the median for both sides.

k-diffusion (``pip install --no-deps k-diffusion torchsde torchdiffeq trampoline``, the
``samplers-peers`` extra) is loaded without its package ``__init__`` (which imports its training
stack): only ``k_diffusion.sampling`` and its ``utils``, with torchvision stubbed when it is absent
(``utils`` imports it for image helpers the samplers do not call).  Without it the k-diffusion
rows are skipped and the JSON says so.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import sys
import time
import types
from datetime import date
from pathlib import Path

import torch

import sdinfer
from sdinfer.auto_sampler import (DEFAULT_CANDIDATES, NFES, AutoTable, choose, evaluate, per_sample_mse,
                                  resolve, robust_score)
from sdinfer.calibrate import compute_ems
from sdinfer.denoiser import Denoiser
from sdinfer.eval import gaussian_mixture as gm
from sdinfer.samplers.optimal_grid import compute_grid

ROOT = Path(__file__).resolve().parent.parent
TRIM = 0.05
SEEDS = {"calibration": 101, "validation": 202, "evaluation": 303}


# ---- diffusers --------------------------------------------------------------------------------
def diffusers_schedulers(quick: bool):
    from diffusers import (DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                           DPMSolverSinglestepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                           LMSDiscreteScheduler, UniPCMultistepScheduler)
    base = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="epsilon")
    dpm = lambda **kw: (lambda: DPMSolverMultistepScheduler(**base, **kw))  # noqa: E731
    unipc = lambda **kw: (lambda: UniPCMultistepScheduler(**base, **kw))  # noqa: E731
    out = {
        "DDIM trailing": lambda: DDIMScheduler(**base, clip_sample=False, timestep_spacing="trailing",
                                               set_alpha_to_one=True),
        "DPMSolverMultistep++ 2": dpm(),
        "DPMSolverMultistep++ 3": dpm(solver_order=3),
        "DPMSolverMultistep++ 2 karras": dpm(use_karras_sigmas=True),
        "DPMSolverMultistep++ 3 karras": dpm(solver_order=3, use_karras_sigmas=True),
        "DPMSolverMultistep++ 2 lu_lambdas": dpm(use_lu_lambdas=True),
        "DPMSolverMultistep++ 3 lu_lambdas": dpm(solver_order=3, use_lu_lambdas=True),
        "UniPCMultistep bh2 2": unipc(),
        "UniPCMultistep bh2 3": unipc(solver_order=3),
        "UniPCMultistep bh1 3": unipc(solver_order=3, solver_type="bh1"),
        "UniPCMultistep bh2 3 karras": unipc(solver_order=3, use_karras_sigmas=True),
    }
    if not quick:
        out.update({
            "DPMSolverMultistep++ 2 trailing": dpm(timestep_spacing="trailing"),
            "DPMSolverMultistep++ 3 trailing": dpm(solver_order=3, timestep_spacing="trailing"),
            "DPMSolverMultistep++ 3 exponential": dpm(solver_order=3, use_exponential_sigmas=True),
            "DPMSolverMultistep 3 (dpmsolver)": dpm(solver_order=3, algorithm_type="dpmsolver"),
            "DPMSolverMultistep++ 2 sigma_min": dpm(final_sigmas_type="sigma_min"),
            "DPMSolverSinglestep 2": lambda: DPMSolverSinglestepScheduler(**base, lower_order_final=True),
            "DPMSolverSinglestep 3": lambda: DPMSolverSinglestepScheduler(**base, solver_order=3,
                                                                          lower_order_final=True),
            "UniPCMultistep bh2 2 karras": unipc(use_karras_sigmas=True),
            "UniPCMultistep bh2 3 trailing": unipc(solver_order=3, timestep_spacing="trailing"),
            "UniPCMultistep bh2 3 lu_lambdas": unipc(solver_order=3, use_lu_lambdas=True),
            "DEISMultistep 2": lambda: DEISMultistepScheduler(**base, solver_order=2),
            "DEISMultistep 3": lambda: DEISMultistepScheduler(**base, solver_order=3),
            "DEISMultistep 3 karras": lambda: DEISMultistepScheduler(**base, solver_order=3, use_karras_sigmas=True),
            "EulerDiscrete trailing": lambda: EulerDiscreteScheduler(**base, timestep_spacing="trailing"),
            "EulerDiscrete karras": lambda: EulerDiscreteScheduler(**base, use_karras_sigmas=True),
            "HeunDiscrete": lambda: HeunDiscreteScheduler(**base),
            "HeunDiscrete karras": lambda: HeunDiscreteScheduler(**base, use_karras_sigmas=True),
            "LMSDiscrete karras": lambda: LMSDiscreteScheduler(**base, use_karras_sigmas=True),
        })
    return out


@torch.no_grad()
def run_diffusers(make, nfe: int, eps_model, x_T: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The scheduler at the most steps whose model calls fit ``nfe``; (end, calls)."""
    for steps in range(nfe, 0, -1):
        scheduler = make()
        scheduler.set_timesteps(steps)
        if len(scheduler.timesteps) <= nfe:
            break
    x = x_T.clone() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = eps_model(scheduler.scale_model_input(x, t), t.reshape(1).double())
        x = scheduler.step(out, t, x).prev_sample
    return x.double(), len(scheduler.timesteps)


# ---- k-diffusion ------------------------------------------------------------------------------
def load_k_diffusion():
    """``k_diffusion.sampling`` without the package's ``__init__``, or None where it is not installed."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    if "k_diffusion" not in sys.modules:
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = package
    import diffusers  # noqa: F401  (before the stub below, which it must not see)

    stubs = []
    if importlib.util.find_spec("torchvision") is None:
        stubs = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
        for name in stubs:
            sys.modules[name] = types.ModuleType(name)
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError as err:
        print(f"k-diffusion's sampling module does not import ({err}); its rows are skipped", file=sys.stderr)
        return None
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


TWO_EVALUATIONS = {"heun", "dpm_2", "dpmpp_2s", "dpmpp_sde"}


def k_samplers(k, quick: bool):
    zero = lambda x: (lambda sigma, sigma_next: torch.zeros_like(x))  # noqa: E731
    out = {
        "euler": lambda m, x, s: k.sample_euler(m, x, s, disable=True),
        "heun": lambda m, x, s: k.sample_heun(m, x, s, disable=True),
        "dpmpp_2m": lambda m, x, s: k.sample_dpmpp_2m(m, x, s, disable=True),
        "dpmpp_3m (3m_sde eta 0)": lambda m, x, s: k.sample_dpmpp_3m_sde(m, x, s, eta=0.0, disable=True,
                                                                          noise_sampler=zero(x)),
        "lms": lambda m, x, s: k.sample_lms(m, x, s, disable=True),
    }
    if not quick:
        out.update({
            "dpm_2": lambda m, x, s: k.sample_dpm_2(m, x, s, disable=True),
            "dpmpp_2s (ancestral eta 0)": lambda m, x, s: k.sample_dpmpp_2s_ancestral(m, x, s, eta=0.0, disable=True,
                                                                                      noise_sampler=zero(x)),
            "dpmpp_2m_sde heun (eta 0)": lambda m, x, s: k.sample_dpmpp_2m_sde(m, x, s, eta=0.0, disable=True,
                                                                               noise_sampler=zero(x),
                                                                               solver_type="heun"),
            "dpmpp_sde (eta 0)": lambda m, x, s: k.sample_dpmpp_sde(m, x, s, eta=0.0, disable=True,
                                                                    noise_sampler=zero(x)),
        })
    return out


def k_grids(k, sched, quick: bool):
    """Sigma grids (n steps, ending at 0) over the schedule's training sigmas."""
    ac = sched.alphas_cumprod.double()
    sigmas = ((1 - ac) / ac).sqrt()
    lo, hi = float(sigmas[0]), float(sigmas[-1])
    log_sigmas = sigmas.log()

    def discrete(n):  # k-diffusion's DiscreteSchedule.get_sigmas: t uniform over the training steps
        t = torch.linspace(len(sigmas) - 1, 0, n, dtype=torch.float64)
        low, high = t.floor().long(), t.ceil().long()
        w = t - low
        s = ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
        return torch.cat([s, s.new_zeros(1)])

    out = {"karras": lambda n: k.get_sigmas_karras(n, lo, hi).double(),
           "exponential": lambda n: k.get_sigmas_exponential(n, lo, hi).double(),
           "discrete": discrete}
    if not quick:
        out["polyexponential rho 2"] = lambda n: k.get_sigmas_polyexponential(n, lo, hi, rho=2.0).double()
        out["karras rho 5"] = lambda n: k.get_sigmas_karras(n, lo, hi, rho=5.0).double()
    return out


@torch.no_grad()
def run_k(sample, name: str, grid, nfe: int, mixture, labels, guidance: float, x_T: torch.Tensor, sched):
    """A k-diffusion sampler on a grid at the most steps that fit ``nfe``; (end, calls)."""
    calls = [0]

    def denoiser(x, sigma):
        calls[0] += 1
        s = sigma.double().reshape(-1)
        alpha = 1.0 / (1.0 + s**2).sqrt()
        return mixture.guided_x0(x * alpha.view(-1, *([1] * (x.ndim - 1))), alpha, s * alpha, labels, guidance)

    steps = (nfe + 1) // 2 if name.split(" ")[0] in TWO_EVALUATIONS else nfe
    sigmas = grid(steps)
    x = sample(denoiser, x_T.double() / float(sched.alpha(1.0)), sigmas)   # the same start as ours
    return x, calls[0]


# ---- learned grids (LD3's objective, the library's learn_grid) on calibration noise ------------
def learned_grids(den, x, cond, uncond, mixture, sched, guidance, nfes, aids, evals: int):
    """Per learned candidate of ``DEFAULT_CANDIDATES`` and NFE, its grid learned by ``learn_grid`` on
    the calibration trajectories against their exact ends, scored by the trimmed error."""
    from sdinfer.samplers.base import ExplicitGrid, continuous_grid, sample_loop
    from sdinfer.samplers.learned_grid import LearnedGrids, learn_grid

    ref = mixture.reference(sched, x, cond, guidance)
    grids = LearnedGrids()
    table = AutoTable(guidance, {}, aids=aids)
    for cand in [c for c in DEFAULT_CANDIDATES if c.spacing == "learned"]:
        for nfe in nfes:
            steps = cand.steps(nfe)
            table.entries[nfe] = {**cand.as_dict(), "spacing": "logsnr"}
            solver, _, _, _ = resolve(table, nfe)

            def error(times, solver=solver, steps=steps):
                try:
                    end = sample_loop(den, solver, x.clone(), steps, cond, uncond, spacing=ExplicitGrid(times))
                except (ValueError, FloatingPointError):
                    return float("inf")
                return robust_score(per_sample_mse(end, ref), TRIM)

            starts = {name: continuous_grid(den, steps, name) for name in ("logsnr", "karras", "time_uniform",
                                                                            "time_quadratic", "trailing")}
            starts["gits"] = continuous_grid(den, steps, aids["gits"])
            times, info = learn_grid(error, starts, max_evals=evals)
            grids.add(cand.sampler, steps, times, info)
    return grids


# ---- one problem ------------------------------------------------------------------------------
def stats(mse: torch.Tensor) -> dict:
    return {"trimmed": robust_score(mse, TRIM), "rms": float(mse.mean().sqrt()),
            "median": float(mse.median().sqrt())}


def run_problem(name: str, guidance: float, sizes: dict, nfes: list[int], quick: bool, k, reduced: bool) -> dict:
    mixture = gm.MIXTURES[name]()
    sched = gm.schedule()
    guided = guidance != 1.0
    den = Denoiser(mixture.model_fn(sched), sched, "sample", guidance)

    def inputs(part: str):
        x, labels = mixture.noise(sizes[part], SEEDS[part], guided=guided)
        return x, labels, (torch.full_like(labels, -1) if guided else None)

    started = time.perf_counter()
    x_cal, c_cal, u_cal = inputs("calibration")
    ems = compute_ems(den, x_cal, c_cal, u_cal, points=200, generator=torch.Generator().manual_seed(1))
    grid = compute_grid(den, x_cal[:128], c_cal[:128], None if u_cal is None else u_cal[:128], points=60)
    aids = {"dpm-solver-v3": ems, "gits": grid}
    aids["learned-grid"] = learned_grids(den, x_cal[:sizes["learned"]], c_cal[:sizes["learned"]],
                                         None if u_cal is None else u_cal[:sizes["learned"]], mixture, sched,
                                         guidance, nfes, aids, evals=sizes["evals"])

    x_val, c_val, u_val = inputs("validation")
    ref_val = mixture.reference(sched, x_val, c_val, guidance)
    candidates = list(DEFAULT_CANDIDATES)
    errors = evaluate(den, candidates, x_val, c_val, u_val, ref_val, nfes, aids)
    choice = choose(errors, TRIM, resamples=100 if quick else 200)
    table = AutoTable.from_choice(guidance, choice, {c.name: c for c in candidates},
                                  {"mixture": name}, aids)

    x_ev, c_ev, u_ev = inputs("evaluation")
    ref_ev = mixture.reference(sched, x_ev, c_ev, guidance)
    cells = []
    eps_model = mixture.guided_model(sched, c_ev, guidance, prediction="epsilon")
    peers_d = diffusers_schedulers(reduced)
    peers_k = k_samplers(k, reduced) if k is not None else {}
    grids_k = k_grids(k, sched, reduced) if k is not None else {}
    for nfe in nfes:
        auto = sdinfer.sample(mixture.model_fn(sched), x_ev.clone(), sched, sampler="auto", steps=nfe,
                              prediction_type="sample", cond=c_ev, uncond=u_ev, guidance_scale=guidance,
                              auto=table)
        auto_mse = per_sample_mse(auto, ref_ev)
        peers = {}
        for pname, make in peers_d.items():
            try:
                try:
                    end, calls = run_diffusers(make, nfe, eps_model, x_ev)
                except RuntimeError:  # UniPC solves in float32 whatever the sample's dtype
                    end, calls = run_diffusers(make, nfe, lambda x, t: eps_model(x, t).float(), x_ev.float())
            except Exception as err:  # a scheduler refusing a step count: no row at this NFE
                print(f"  diffusers {pname} at NFE {nfe}: {type(err).__name__}: {err}", file=sys.stderr)
                continue
            assert calls <= nfe, (pname, calls, nfe)
            peers[f"diffusers {pname}"] = per_sample_mse(end, ref_ev)
        for sname, sample in peers_k.items():
            for gname, g in grids_k.items():
                end, calls = run_k(sample, sname, g, nfe, mixture, c_ev, guidance, x_ev, sched)
                assert calls <= nfe, (sname, calls, nfe)
                peers[f"k-diffusion {sname} [{gname}]"] = per_sample_mse(end, ref_ev)
        if k is not None:
            calls = [0]

            def kd(x, sigma):
                calls[0] += 1
                s = sigma.double().reshape(-1)
                a = 1.0 / (1.0 + s**2).sqrt()
                return mixture.guided_x0(x * a.view(-1, *([1] * (x.ndim - 1))), a, s * a, c_ev, guidance)
            lo, hi = (float(v) for v in k_grids(k, sched, True)["discrete"](2)[[1, 0]])
            end = k.sample_dpm_fast(kd, x_ev.double() / float(sched.alpha(1.0)), lo, hi, nfe, disable=True)
            if calls[0] <= nfe:
                peers["k-diffusion dpm_fast"] = per_sample_mse(end, ref_ev)
        peer_stats = {p: stats(m) for p, m in peers.items()}
        best = min(peer_stats, key=lambda p: peer_stats[p]["trimmed"])
        best_rms = min(peer_stats, key=lambda p: peer_stats[p]["rms"])
        entry = table.entries[nfe]
        cells.append({"nfe": nfe, "auto": stats(auto_mse), "auto_choice": table.candidate(nfe).name,
                      "validation_score": entry["score"], "validation_interval": entry["interval"],
                      "stability": entry["stability"], "best_peer": best, "best_peer_stats": peer_stats[best],
                      "best_peer_by_rms": best_rms, "best_peer_rms": peer_stats[best_rms]["rms"],
                      "ratio": stats(auto_mse)["trimmed"] / peer_stats[best]["trimmed"],
                      "ratio_rms": stats(auto_mse)["rms"] / peer_stats[best_rms]["rms"],
                      "peers": peer_stats})
        print(f"{name} cfg {guidance:g} NFE {nfe}: auto {cells[-1]['auto']['trimmed']:.5f} "
              f"({cells[-1]['auto_choice']}) vs {best} {peer_stats[best]['trimmed']:.5f}: "
              f"x{cells[-1]['ratio']:.2f} (all-trajectory RMS x{cells[-1]['ratio_rms']:.2f})", flush=True)
    return {"mixture": name, "shape": list(mixture.shape), "peers": "reduced" if reduced else "all",
            "peer_count": len(cells[0]["peers"]) if cells else 0, "components": int(mixture.means.shape[0]),
            "classes": mixture.classes, "guidance": guidance, "sizes": sizes,
            "seconds": time.perf_counter() - started, "cells": cells,
            "validation_errors": {c: {str(n): robust_score(v, TRIM) for n, v in per.items()}
                                  for c, per in errors.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="NFE 5, 10, 20; 64 trajectories per set; fewer peers")
    parser.add_argument("--problems", default=None,
                        help="comma list of MIXTURE:GUIDANCE (default: every one of gaussian_mixture.PROBLEMS)")
    parser.add_argument("--trajectories", type=int, default=256,
                        help="validation and evaluation trajectories each (default: 256; --quick: 64)")
    parser.add_argument("--learned", type=int, default=128,
                        help="calibration trajectories the grids are learned on (default: 128; --quick: 64)")
    parser.add_argument("--evals", type=int, default=60, help="most trial grids per learned grid (default: 60; "
                                                              "--quick: 20)")
    parser.add_argument("--peers", choices=("all", "reduced"), default=None,
                        help="public samplers to run: all, or the reduced set --quick runs (11 diffusers "
                             "configurations, 5 k-diffusion samplers on 3 grids) (default: all; --quick: reduced)")
    parser.add_argument("--merge", nargs="*", default=[], metavar="JSON",
                        help="instead of running: join these runs' problems into --out")
    parser.add_argument("--out", default=None, help="JSON to write (default: bench/results/mixture-samplers.json; "
                                                    "--quick: mixture-samplers-quick.json)")
    args = parser.parse_args(argv)
    problems = gm.PROBLEMS if args.problems is None else [
        (p.split(":")[0], float(p.split(":")[1])) for p in args.problems.split(",")]
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        "mixture-samplers-quick.json" if args.quick else "mixture-samplers.json")
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        meta = {**runs[0]["meta"], "command": " ; ".join(r["meta"]["command"] for r in runs)}
        order = {p: i for i, p in enumerate(gm.PROBLEMS)}
        problems = sorted((p for r in runs for p in r["problems"]),
                          key=lambda p: order.get((p["mixture"], p["guidance"]), len(order)))
        out.write_text(json.dumps({"meta": meta, "problems": problems}, indent=1) + "\n")
        print(f"wrote {out}")
        return 0
    nfes = [5, 10, 20] if args.quick else list(NFES)
    n = 64 if args.quick else args.trajectories
    sizes = {"calibration": 128 if args.quick else 256, "learned": 64 if args.quick else args.learned,
             "validation": n, "evaluation": n, "evals": 20 if args.quick else args.evals}
    k = load_k_diffusion()
    reduced = args.peers == "reduced" or (args.quick and args.peers is None)
    results = [run_problem(name, g, sizes, nfes, args.quick, k, reduced) for name, g in problems]
    meta = {"command": "python bench/mixture_samplers.py" + (" --quick" if args.quick else
                                                             f" --trajectories {n} --learned {args.learned} "
                                                             f"--evals {args.evals}"
                                                             + (" --peers reduced" if reduced else ""))
            + (f" --problems {args.problems}" if args.problems else ""),
            "date": date.today().isoformat(), "machine": f"{platform.machine()} CPU, torch {torch.__version__}",
            "trim": TRIM, "k_diffusion": "k-diffusion 0.1.1.post1 sampling" if k is not None else
            "not installed: its rows are skipped", "seeds": SEEDS}
    out.write_text(json.dumps({"meta": meta, "problems": results}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
