"""DPM-Solver-v3 with a model's shipped statistics against DPM-Solver++ (and UniPC) at low NFE.

    python bench/dpm_solver_v3.py --model unet [--prompts 16]

Held-out prompts (never trained on, never calibrated on) with noise seeds 10000+ (the
calibration used seeds 0-63), guidance 4; `dpm-solver-v3` alone is the default (order 1, with
the pseudo-order corrector where the statistics file's validation chose it).  Error: RMS distance of the final sample to a
1000-step DPM-Solver++(3M) solution from the same noise.  Each solver runs on the trailing
and the uniform-lambda grids and on the GITS grid the model ships; the last rows give the best
of each family per NFE.  ``--only REGEX`` runs only the matching solver specs.
"""

from __future__ import annotations

import argparse
import re

import torch

from sdinfer.cli import _quiet_libraries
from sdinfer.models.default import shapes
from sdinfer.pipeline import Pipeline
from sdinfer.samplers import get_sampler, sample_loop

NFES = [5, 6, 8, 10, 12, 15, 20]
GRIDS = ["trailing", "logsnr", "gits"]
SOLVERS = {
    "dpm-solver++": ["dpm-solver++", "dpm-solver++:order=3"],
    "unipc": ["unipc", "unipc:order=3"],
    "dpm-solver-v3": ["dpm-solver-v3", "dpm-solver-v3:use_corrector=true", "dpm-solver-v3:use_corrector=false",
                      "dpm-solver-v3:order=2", "dpm-solver-v3:order=2,use_corrector=false"],
    "dpm-solver-v3 degenerated": ["dpm-solver-v3:degenerated=true",
                                  "dpm-solver-v3:degenerated=true,order=2"],
}
CFG = 4.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="unet")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default=None, help="run only the solver specs that match this regex")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet_libraries()
    pipe = Pipeline.from_pretrained(args.model)
    texts = shapes.heldout_prompts()[:args.prompts]
    cond, uncond = pipe.encode(texts), pipe.encode([""] * len(texts))
    x_T = pipe.noise([10_000 + i for i in range(len(texts))], pipe.check_size(None))

    grids = {g: pipe.time_grid(g, CFG, max(NFES)) for g in GRIDS}

    def run(spec: str, steps: int, grid: str | None = None) -> torch.Tensor:
        solver = get_sampler(spec)
        pipe.attach_statistics(solver, CFG)
        with torch.no_grad():
            return sample_loop(pipe.denoiser(CFG), solver, x_T.clone(), steps, cond, uncond,
                               spacing=grids.get(grid, grid))

    ref = run("dpm-solver++:order=3", 1000)
    print(f"model {args.model}, {len(texts)} held-out prompts, cfg {CFG:g}; RMS error against "
          "1000-step DPM-Solver++(3M)\n")
    print("| solver | grid | " + " | ".join(f"NFE {n}" for n in NFES) + " |")
    print("|---|---|" + "---|" * len(NFES))
    best = {family: [float("inf")] * len(NFES) for family in SOLVERS}
    for family, specs in SOLVERS.items():
        for spec in specs:
            if args.only and not re.search(args.only, spec):
                continue
            for grid in GRIDS:
                errors = [float((run(spec, n, grid) - ref).square().mean().sqrt()) for n in NFES]
                best[family] = [min(a, b) for a, b in zip(best[family], errors)]
                print(f"| {spec} | {grid} | " + " | ".join(f"{e:.4f}" for e in errors) + " |", flush=True)
    for family, errors in best.items():
        if errors[0] == float("inf"):
            continue
        print(f"| best {family} | | " + " | ".join(f"{e:.4f}" for e in errors) + " |")


if __name__ == "__main__":
    main()
