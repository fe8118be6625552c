"""``sdinfer bench``: configurations against a baseline over a prompt set (and StepSaver's
``--min-steps`` labels)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from ..errors import UserError
from .options import add_model_options, check_outputs, load_pipeline


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="measure configurations against a baseline",
                       description="Run configurations and their baseline over a prompt set and "
                                   "report NFE, MACs, wall time, memory, PSNR/SSIM against the "
                                   "baseline, prompt adherence and speed-ups.")
    add_model_options(b, many_steps=True)
    b.add_argument("--baseline", default=None,
                   help="SAMPLER:STEPS of the reference run, e.g. ddim:250 (default: the same "
                        "sampler at the largest --steps, nothing accelerated)")
    b.add_argument("--prompts", default="quick",
                   help="quick (8 prompts) | heldout (200 unseen captions) | FILE with one prompt per line")
    b.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    b.add_argument("--batch", type=int, default=50, help="prompts per batch (default: 50)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (default: 3)")
    b.add_argument("--accelerate", action="append", default=None, metavar="SPEC",
                   help="a configuration with this accelerator installed, e.g. deepcache:interval=3; "
                        "repeat for a sweep (each at every --steps)")
    b.add_argument("--preset", action="append", default=None, metavar="FILE",
                   help="a configuration from sdinfer tune's preset (repeat for several); with --preset the "
                        "configurations are the presets (and any --accelerate), --sampler/--steps only set the "
                        "default baseline, the preset's model and --cfg apply unless given (an explicit --cfg "
                        "overrides the presets' guidance scale, with a note)")
    b.add_argument("--json", default=None, help="write the records to this JSON file")
    b.add_argument("--plot", default=None, help="write a quality-vs-speed-up plot to this PNG file")
    b.add_argument("--min-steps", action="store_true",
                   help="StepSaver: per prompt, the fewest of --steps within --threshold dB PSNR "
                        "of the baseline's image")
    b.add_argument("--threshold", type=float, default=30.0, help="PSNR threshold in dB for --min-steps (default: 30)")
    b.add_argument("--save-predictor", default=None,
                   help="with --min-steps: fit a step predictor on the labels and save it here "
                        "(use it with generate --steps auto --predictor PATH)")
    b.set_defaults(func=run)


def run(args) -> int:
    from ..eval import bench
    from ..eval.prompts import load_prompts

    for target in (args.json, args.plot):
        if target:
            check_outputs([Path(target).with_suffix(".png")], True)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib; install it with pip install 'sdinfer[plot]'") from None
    presets = _presets(args)
    prompts = load_prompts(args.prompts)
    if args.limit:
        prompts = prompts[: args.limit]
    try:
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        raise UserError(f"--steps {args.steps!r} must be whole numbers separated by commas") from None
    specs = [bench.RunSpec(sampler=args.sampler, steps=s, cfg=args.cfg, accelerate=a)
             for a in (args.accelerate or ([] if presets else [""])) for s in steps]
    specs = [dataclasses.replace(p.run_spec(), cfg=args.cfg) for p in presets] + specs
    baseline = (bench.RunSpec.parse_baseline(args.baseline, args.cfg) if args.baseline
                else bench.RunSpec(sampler=args.sampler, steps=max(steps), cfg=args.cfg))
    pipe = load_pipeline(args)
    for spec in args.accelerate or []:   # a bad spec fails before any timing starts
        _check_accelerate(pipe, spec)
    for p in presets:
        if p.accelerate:
            _check_accelerate(pipe, p.accelerate)
    if args.min_steps:
        if presets:
            raise UserError("--min-steps labels step counts of one sampler; leave --preset out")
        return _min_steps(args, pipe, prompts, steps, baseline)
    if args.save_predictor:
        raise UserError("--save-predictor goes with --min-steps")
    report = bench.run_bench(pipe, specs, baseline, prompts, batch=args.batch, seed=args.seed,
                             repeats=args.repeats, size=args.size,
                             log=lambda m: print(m, file=sys.stderr))
    print(bench.format_table(report))
    if args.json:
        bench.write_json(report, Path(args.json))
        print(f"wrote {args.json}")
    if args.plot:
        bench.plot(report, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


def _presets(args) -> list:
    """The ``--preset`` files, loaded; their model and guidance scale become --model's and --cfg's
    unless those are given (an explicit --cfg that differs is said)."""
    from ..tune.preset import load_preset
    from .options import given

    presets = [load_preset(p) for p in args.preset or []]
    if not presets:
        return presets
    models = {p.model for p in presets}
    if not given(args, "--model"):
        if len(models) > 1:
            raise UserError(f"the presets were tuned on different models ({', '.join(sorted(models))}); "
                            "pass --model, or bench one model's presets at a time")
        args.model = presets[0].model
    scales = {p.guidance_scale for p in presets}
    if given(args, "--cfg"):
        if scales != {args.cfg}:
            print(f"note: --cfg {args.cfg:g} overrides the presets' guidance scale "
                  f"{', '.join(f'{s:g}' for s in sorted(scales))}", file=sys.stderr)
    elif len(scales) > 1:
        raise UserError("the presets have different guidance scales; pass --cfg for the bench")
    else:
        args.cfg = presets[0].guidance_scale
    return presets


def _check_accelerate(pipe, spec: str):
    from ..accelerate import accelerate

    accelerate(pipe, spec).remove()


def _min_steps(args, pipe, prompts, candidates, baseline) -> int:
    import json

    from ..stepsaver import StepPredictor, find_min_steps, prompt_features

    if args.save_predictor:
        check_outputs([Path(args.save_predictor).with_suffix(".png")], True)
    labels = find_min_steps(pipe, prompts, sampler=baseline.sampler, reference_steps=baseline.steps,
                            candidates=candidates, threshold_db=args.threshold,
                            guidance_scale=baseline.cfg, seed=args.seed, batch=args.batch)
    saved = 1 - labels.mean_steps / labels.reference_steps
    print(f"fewest steps within {args.threshold} dB of {baseline.sampler}:{baseline.steps} over "
          f"{len(prompts)} prompts: mean {labels.mean_steps:.1f} steps ({100 * saved:.0f}% saved), "
          f"min {min(labels.steps)}, max {max(labels.steps)}")
    if args.json:
        Path(args.json).write_text(json.dumps(labels.as_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.save_predictor:
        predictor = StepPredictor.fit(prompt_features(pipe, prompts), labels.steps,
                                      sorted(set(candidates) | {baseline.steps}))
        predictor.save(Path(args.save_predictor))
        print(f"wrote the step predictor {args.save_predictor}")
    return 0
