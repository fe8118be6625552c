"""``sdinfer tune``: the fastest configuration of a model that keeps a quality budget against
the 50-step DDIM reference on validation prompts; writes the preset and the Pareto front."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError
from .options import MODEL_HELP, add_device_options, load_pipeline, whole_number


def add_parser(sub) -> None:
    t = sub.add_parser("tune", help="find the fastest configuration within a quality budget",
                       description="Search sampler x steps x time grid x analytic first step x cache (and "
                                   "per-prompt steps where the model has a step predictor) for the fastest "
                                   "configuration whose images stay within BUDGET of the 50-step DDIM reference "
                                   "(same --cfg) on validation prompts (never the held-out ones): binary search "
                                   "on the step count per setting, successive halving over the prompts, the "
                                   "finalists timed against the reference. Writes DIR/preset.json (run it with "
                                   "generate/bench --preset), DIR/front.json and DIR/front.png.")
    t.add_argument("--model", default="default", help=MODEL_HELP)
    t.add_argument("--budget", required=True,
                   help="quality floor: adherence-drop=0.02 (adherence at most 2 points below the reference's), "
                        "psnr=35 (dB against the reference images), ssim=0.9; several joined by commas")
    t.add_argument("--validation", type=whole_number, default=128, metavar="N",
                   help="validation prompts (the first N of the validation set; default: 128: with fewer, the fastest of many candidates that pass is more often one that passed by luck)")
    t.add_argument("--prompts", default="validation",
                   help="validation (default: captions of the training grammar, none held out) | FILE with one "
                        "prompt per line (with a psnr or ssim budget)")
    t.add_argument("--time-limit", type=float, default=None, metavar="MIN",
                   help="stop searching after MIN minutes and choose among what met the budget so far "
                        "(the finalists' timing runs after it)")
    t.add_argument("--cfg", type=float, default=4.0, help="guidance scale of the reference and the preset (default: 4)")
    t.add_argument("--space", choices=("full", "small"), default="full",
                   help="full: every sampler, grid, first step and cache the model supports; small: ddim and "
                        "dpm-solver++ on their own grids, no cache (default: full)")
    t.add_argument("--batch", type=whole_number, default=32, help="prompts per generated batch (default: 32)")
    t.add_argument("--repeats", type=whole_number, default=1, help="timed runs of the finalists (default: 1)")
    t.add_argument("--out", default="tuned", metavar="DIR",
                   help="folder for preset.json, front.json, front.png (default: tuned)")
    add_device_options(t)
    t.set_defaults(func=run)


def run(args) -> int:
    from ..eval.prompts import load_prompts
    from ..tune.budget import parse_budget

    budget = parse_budget(args.budget)
    if args.prompts == "heldout":
        raise UserError("--prompts heldout would tune on the prompts the held-out check measures; use validation "
                        "or a FILE, and check the preset on heldout with sdinfer bench --preset")
    if args.validation < 1:
        raise UserError(f"--validation must be >= 1, got {args.validation}")
    if args.time_limit is not None and args.time_limit <= 0:
        raise UserError(f"--time-limit is minutes > 0, got {args.time_limit:g}")
    if args.batch < 1 or args.repeats < 1:
        raise UserError("--batch and --repeats must be >= 1")
    if args.cfg < 0:
        raise UserError(f"--cfg must be >= 0, got {args.cfg:g}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if args.prompts == "validation":
        from ..eval.prompts import validation_prompts

        prompts = validation_prompts(args.validation)
    else:
        prompts = load_prompts(args.prompts)[: args.validation]
    pipe = load_pipeline(args)
    from ..tune.run import tune
    from ..tune.space import model_space

    space = model_space(pipe, args.cfg, size=args.space)
    tuned = tune(pipe, budget, prompts, cfg=args.cfg, out=out, space=space,
                 time_limit_s=None if args.time_limit is None else args.time_limit * 60, batch=args.batch,
                 repeats=args.repeats, log=lambda m: print(m, file=sys.stderr))
    p, v = tuned.preset, tuned.preset.validation
    r = tuned.result
    print(f"preset: {p.describe()}")
    drop = v.get("adherence_drop")
    print(f"on {v['prompts']} validation prompts: {v['speedup_wall']:.2f}x faster than {p.reference} in wall time "
          f"(interleaved), {v['speedup_macs']:.2f}x in MACs; PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.4f}"
          + ("" if drop is None else f", adherence {v['adherence']:.1%} (reference {v['reference_adherence']:.1%})"))
    print(f"search: {len(r.evaluations)} evaluations ({r.images} images) of {v['grid_candidates']} candidates in the "
          f"grid, {tuned.seconds:.0f} s" + (" (stopped at the time limit)" if r.stopped_early else ""))
    print(f"wrote {out / 'preset.json'}, {out / 'front.json'}"
          + (f", {out / 'front.png'}" if tuned.plotted else
             " (no front.png: matplotlib is missing; pip install 'sdinfer[plot]')"))
    return 0
