"""DPM-Solver-v3 with a model's shipped statistics against DPM-Solver++ (and UniPC) at low NFE.

    python bench/dpm_solver_v3.py --model unet [--prompts 16] [--also-first 16] [--json OUT]

Held-out prompts (never trained on, never calibrated on) with noise seeds 10000+ (the
calibration used seeds 0-63, the corrector's validation 100000+), guidance 4;
`dpm-solver-v3` alone is the default (order 1, with the corrector mode -- on, half, off --
that the statistics file's validation chose for the step count, and DPM-Solver++(2M) steps at
the step counts where that validation found it better: ``variant_by_steps``);
`dpm-solver-v3:variant=v3` is v3 at every step count.  Error: RMS distance of the
final sample to a 1000-step DPM-Solver++(3M) solution from the same noise, over all prompts
(the first table), and the median of the per-prompt RMS errors (the second): at few steps a
guided trajectory sometimes ends in another image altogether (a per-prompt error near 0.5),
and the first table counts those, the second the typical prompt.  Each solver runs on the
trailing and the uniform-lambda grids and on the GITS grid the model ships; the last rows
give the best of each family per NFE.  ``--only REGEX`` runs only the matching solver specs;
``--also-first K`` prints the tables again over the first K prompts alone (the same runs);
``--tables-from JSON`` prints the tables of an earlier run's ``--json`` file.
"""

from __future__ import annotations

import argparse
import json
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
    "dpm-solver-v3": ["dpm-solver-v3", "dpm-solver-v3:variant=v3", "dpm-solver-v3:use_corrector=true",
                      "dpm-solver-v3:use_corrector=half",
                      "dpm-solver-v3:use_corrector=false",
                      "dpm-solver-v3:order=2", "dpm-solver-v3:order=2,use_corrector=false"],
    "dpm-solver-v3 degenerated": ["dpm-solver-v3:degenerated=true",
                                  "dpm-solver-v3:degenerated=true,order=2"],
}
CFG = 4.0
STATISTICS = {"RMS error over all prompts": lambda e: float(e.square().mean().sqrt()),
              "median of the per-prompt RMS errors": lambda e: float(e.quantile(0.5))}


def print_tables(rows: dict[tuple[str, str], list[list[float]]], first: int | None = None) -> None:
    """The RMS and median tables of ``rows`` ((spec, grid) -> per NFE, per-prompt errors)."""
    for title, stat in STATISTICS.items():
        print(f"\n{title}" + (f" (the first {first} prompts)" if first else "") + "\n")
        print("| solver | grid | " + " | ".join(f"NFE {n}" for n in NFES) + " |")
        print("|---|---|" + "---|" * len(NFES))
        best = {family: [float("inf")] * len(NFES) for family in SOLVERS}
        for (spec, grid), per_nfe in rows.items():
            values = [stat(torch.tensor(e[:first] if first else e)) for e in per_nfe]
            family = next(f for f, specs in SOLVERS.items() if spec in specs)
            best[family] = [min(a, b) for a, b in zip(best[family], values)]
            print(f"| {spec} | {grid} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
        for family, values in best.items():
            if values[0] != float("inf"):
                print(f"| best {family} | | " + " | ".join(f"{v:.4f}" for v in values) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="unet")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--also-first", type=int, default=None, help="also the tables over the first K prompts")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default=None, help="run only the solver specs that match this regex")
    ap.add_argument("--json", default=None, help="write the per-prompt errors here")
    ap.add_argument("--tables-from", default=None,
                    help="print the tables of an earlier run's --json file (a run stopped early too), run nothing")
    args = ap.parse_args()
    if args.tables_from:
        with open(args.tables_from) as f:
            saved = json.load(f)
        print(f"model {saved['model']}, {saved['prompts']} held-out prompts, cfg {CFG:g}; error against "
              "1000-step DPM-Solver++(3M)")
        rows = {tuple(key.split("|")): errors for key, errors in saved["errors"].items()}
        print_tables(rows)
        if args.also_first:
            print_tables(rows, args.also_first)
        return
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
    rows = {}
    for spec in (s for specs in SOLVERS.values() for s in specs):
        if args.only and not re.search(args.only, spec):
            continue
        for grid in GRIDS:
            rows[spec, grid] = [(run(spec, n, grid) - ref).flatten(1).square().mean(1).sqrt().tolist()
                                for n in NFES]
            print(f"{spec} [{grid}] done", flush=True)
            if args.json:  # after each row: a long run stopped early keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"model": args.model, "prompts": len(texts), "nfe": NFES,
                               "errors": {f"{s}|{g}": e for (s, g), e in rows.items()}}, f)
    print(f"\nmodel {args.model}, {len(texts)} held-out prompts, cfg {CFG:g}; error against "
          "1000-step DPM-Solver++(3M)")
    print_tables(rows)
    if args.also_first:
        print_tables(rows, args.also_first)


if __name__ == "__main__":
    main()
