"""The ``sdinfer`` command line: generate, bench, models, train-default."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from .errors import UserError

EXAMPLES = """\
examples:
  sdinfer generate "a red circle in the top left" -o out.png
  sdinfer generate "a blue square in the center" --model dit --steps 25 --cfg 4 --seed 3 -o sq.png
  sdinfer bench --model unet --steps 10,20 --prompts quick --json bench.json --plot bench.png
  sdinfer models
  sdinfer generate "a red circle in the top left" --accelerate deepcache:interval=3
  sdinfer generate "a red circle in the top left" --model dit --parallel ulysses --world-size 2
  sdinfer generate "a red circle in the top left" --parallel asyncdiff:stride=2 --world-size 3
  torchrun --nproc-per-node 2 -m sdinfer generate "a red circle" --model dit --parallel cfg
  sdinfer bench --model dit --accelerate fora:interval=2 --accelerate fora:interval=3
  sdinfer calibrate --model unet --cfg 4
  sdinfer train-default --arch unet
"""


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    return value


def _steps_or_auto(text: str):
    return "auto" if text.strip().lower() == "auto" else _whole_number(text)


# ---- generate -------------------------------------------------------------------------
def _output_paths(out: Path, batch: int) -> list[Path]:
    if batch == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(batch)]


def _check_outputs(paths: list[Path], overwrite: bool) -> None:
    for p in paths:
        if p.suffix.lower() != ".png":
            raise UserError(f"output {p} must end in .png; pass e.g. -o {p.with_suffix('.png')}")
        if p.exists() and not overwrite:
            raise UserError(f"{p} exists; pass --overwrite to replace it or choose another -o")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise UserError(f"cannot write {p}: folder {parent} does not exist; create it first")
        try:  # os.access says yes to root even where writing fails, so try it
            fd, probe = tempfile.mkstemp(suffix=".tmp", dir=parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise UserError(f"cannot write {p}: folder {parent} is not writable ({err.strerror}); "
                            "choose another -o") from None


def _save_png(image, path: Path, metadata: dict) -> None:
    """Write atomically: a temporary file in the same folder, renamed into place."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    fd, tmp = tempfile.mkstemp(suffix=".png.tmp", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cmd_generate(args) -> int:
    if args.parallel or args.world_size is not None:
        return _generate_parallel(args)
    return _generate(args)


def _generate(args, setup=None, rank: int = 0) -> int:
    """Generate and (on rank 0) write; ``setup(pipe)`` installs a parallel strategy."""
    from . import __version__
    from .pipeline import Pipeline

    outputs = _output_paths(Path(args.output), args.batch)
    if rank == 0:
        _check_outputs(outputs, args.overwrite)
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    start = time.perf_counter()
    _quiet_libraries()
    pipe = Pipeline.from_pretrained(args.model)
    if setup is not None:
        setup(pipe)   # the parallel strategy goes on first: caches check that they fit it
    if args.accelerate:
        from .accelerate import accelerate

        accelerate(pipe, args.accelerate)
    loaded = time.perf_counter() - start
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pipe([args.prompt] * args.batch, steps=args.steps, sampler=args.sampler,
                      guidance_scale=args.cfg, seed=args.seed, size=args.size,
                      progress=not args.quiet and rank == 0, predictor=args.predictor,
                      spacing=args.spacing, analytic_first_step=args.analytic_first_step,
                      final=args.final)
    if rank != 0:
        return 0
    if args.accelerate:
        result.params["accelerate"] = args.accelerate
    if args.parallel:
        result.params["parallel"] = args.parallel
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    for i, (image, path) in enumerate(zip(result.images, outputs)):
        meta = {"prompt": args.prompt, **result.params, "seed": args.seed + i,
                "software": f"sdinfer {__version__}"}
        meta["parameters"] = ", ".join(f"{k}: {v}" for k, v in meta.items())
        try:
            _save_png(image, path, meta)
        except OSError as err:
            raise UserError(f"cannot write {path}: {err.strerror or err}; choose another -o") from None
    total = time.perf_counter() - start
    names = ", ".join(str(p) for p in outputs)
    extra = f", {args.accelerate}" if args.accelerate else ""
    extra += f", {args.parallel} parallel" if args.parallel else ""
    print(f"wrote {names} ({result.params['size']}x{result.params['size']}, "
          f"{result.params['sampler']} {result.params['steps']} steps, {result.nfe} NFE{extra}) "
          f"in {total:.2f} s (model load {loaded:.2f} s, generation {result.seconds:.2f} s)")
    return 0


def _generate_parallel(args) -> int:
    """``--parallel``: in a rank (torchrun's or ours) join and generate; else start the ranks."""
    from .parallel import launch

    info = launch.RankInfo.from_env()
    world = _check_parallel(args, info)
    if info is None:
        _check_outputs(_output_paths(Path(args.output), args.batch), args.overwrite)
        codes = launch.launch_local([sys.executable, "-m", "sdinfer", *args.argv], world)
        return launch.exit_code(codes)
    return launch.run_rank(lambda: _generate_rank(args, info), info.rank)


def _check_parallel(args, info) -> int:
    """The world size, once the flags are known to fit together (before any rank starts)."""
    from .parallel import launch, parse_spec

    if not args.parallel:
        raise UserError("--world-size goes with --parallel SPEC, e.g. --parallel cfg --world-size 2")
    config = parse_spec(args.parallel)
    if args.accelerate:
        _check_caches_under(args.accelerate, args.parallel)
    if getattr(config, "needs_guidance", False) and args.cfg == 1:
        raise UserError(f"--parallel {args.parallel} splits the guidance branches and --cfg 1 turns guidance "
                        "off; use a --cfg other than 1, or another strategy")
    if launch.check_backend(args.backend) == "nccl":
        raise UserError("sdinfer generate runs the model on the CPU, whose tensors nccl does not carry; "
                        "use --backend gloo")
    if info is not None and args.world_size not in (None, info.world_size):
        raise UserError(f"--world-size {args.world_size} disagrees with the launcher's WORLD_SIZE "
                        f"{info.world_size}; leave --world-size out under torchrun")
    world = info.world_size if info is not None else args.world_size
    if world is None:
        raise UserError("--parallel needs several ranks: add --world-size 2, or start them with "
                        "torchrun --nproc-per-node 2 -m sdinfer generate ...")
    if world < 2:
        raise UserError(f"--world-size must be >= 2, got {world}")
    try:
        config.check_world_size(world)
    except ValueError as err:
        raise UserError(f"{err}; change --world-size") from None
    return world


def _check_caches_under(spec: str, strategy_spec: str) -> None:
    """Refuse, before any rank starts, a cache that the strategy does not take."""
    from . import cache
    from .parallel import cache_refusal, parse_spec, strategy_of

    strategy = strategy_of(parse_spec(strategy_spec))
    for item in filter(None, (part.strip() for part in spec.split("+"))):
        try:
            reason = cache_refusal(strategy, cache.method_of(cache.parse_spec(item)))
        except ValueError as err:
            raise UserError(str(err)) from None
        if reason:
            raise UserError(f"--accelerate {item}: {reason}")


def _generate_rank(args, info) -> int:
    from .parallel import apply, launch

    launch.init_process_group(args.backend, info=info)
    return _generate(args, setup=lambda pipe: apply(pipe, args.parallel), rank=info.rank)


# ---- bench ----------------------------------------------------------------------------
def cmd_bench(args) -> int:
    from .eval import bench
    from .eval.prompts import load_prompts
    from .pipeline import Pipeline

    for target in (args.json, args.plot):
        if target:
            _check_outputs([Path(target).with_suffix(".png")], True)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib; install it with pip install 'sdinfer[plot]'") from None
    prompts = load_prompts(args.prompts)
    if args.limit:
        prompts = prompts[: args.limit]
    try:
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        raise UserError(f"--steps {args.steps!r} must be whole numbers separated by commas") from None
    specs = [bench.RunSpec(sampler=args.sampler, steps=s, cfg=args.cfg, accelerate=a)
             for a in (args.accelerate or [""]) for s in steps]
    baseline = (bench.RunSpec.parse_baseline(args.baseline, args.cfg) if args.baseline
                else bench.RunSpec(sampler=args.sampler, steps=max(steps), cfg=args.cfg))
    _quiet_libraries()
    pipe = Pipeline.from_pretrained(args.model)
    for spec in args.accelerate or []:   # a bad spec fails before any timing starts
        _check_accelerate(pipe, spec)
    if args.min_steps:
        return _bench_min_steps(args, pipe, prompts, steps, baseline)
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


def _check_accelerate(pipe, spec: str):
    from .accelerate import accelerate

    accelerate(pipe, spec).remove()


def _bench_min_steps(args, pipe, prompts, candidates, baseline) -> int:
    import json

    from .stepsaver import StepPredictor, find_min_steps, prompt_features

    if args.save_predictor:
        _check_outputs([Path(args.save_predictor).with_suffix(".png")], True)
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


# ---- models ---------------------------------------------------------------------------
def cmd_models(args) -> int:
    from .models.loading import DEFAULT_MODELS, load_model

    _quiet_libraries()
    print(f"{'name':<8} {'class':<26} {'parameters':>11} {'on disk':>9}  path")
    for name, path in DEFAULT_MODELS.items():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        model = load_model(name)
        alias = " (default)" if name == "unet" else ""
        print(f"{name:<8} {model.family:<26} {model.num_parameters():>11,} "
              f"{size / 2**20:>7.1f} MB  {path}{alias}")
    return 0


# ---- calibrate ----------------------------------------------------------------------
def calibration_prompts(spec: str, count: int, seed: int) -> list[str]:
    from .eval.prompts import load_prompts
    from .models.default import shapes

    if spec == "train":  # captions the default models were trained on, never held-out ones
        specs = shapes.sample_specs(count, 10**6 + seed, set(shapes.heldout_prompts()))
        return [s.caption for s in specs]
    base = load_prompts(spec)
    return [base[i % len(base)] for i in range(count)]


def _calibration_target(args, default_samples: int, what: str, default_out, rewrite: bool = False):
    """The pipeline to calibrate and the file to write (checked before any work is done);
    ``rewrite``: the file is one to update, not a new one."""
    import torch

    from .pipeline import Pipeline

    args.samples = default_samples if args.samples is None else args.samples
    if args.samples < 1:
        raise UserError(f"--samples must be >= 1, got {args.samples}")
    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet_libraries()
    pipe = Pipeline.from_pretrained(args.model)
    out = Path(args.out) if args.out else default_out(pipe)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it or --out for another file")
    if rewrite and not out.is_file():
        raise UserError(f"there is no {out} to update; calibrate first or give --out")
    if out.suffix != ".safetensors":
        raise UserError(f"{what} are written as safetensors; give --out a .safetensors name, not {out}")
    return pipe, out


def calibrate_cache(args) -> int:
    """``sdinfer calibrate --method CACHE``: record a cache method's calibration beside the model."""
    from .cache import calibration
    from .models import artifacts

    if args.method not in calibration.CALIBRATORS:
        raise UserError(f"unknown calibration method {args.method!r}; available: "
                        f"{', '.join(['dpm-solver-v3', *sorted(calibration.CALIBRATORS)])}")
    if args.steps < 2:
        raise UserError(f"--steps must be >= 2 for a cache calibration, got {args.steps}")
    pipe, out = _calibration_target(args, 16, "calibrations",
                                    lambda pipe: artifacts.writable_path(pipe.model.path, args.method))
    run = calibration.CalibrationRun(pipe, calibration_prompts(args.prompts, args.samples, args.seed),
                                     steps=args.steps, sampler=args.sampler, guidance_scale=args.cfg,
                                     seed=args.seed)
    start = time.perf_counter()
    try:
        result = calibration.CALIBRATORS[args.method](run)
    except ValueError as err:
        raise UserError(str(err)) from None
    result.save(out)
    print(f"wrote {args.method} calibration of {pipe.model.name} ({args.samples} prompts, {args.sampler} "
          f"{args.steps} steps, cfg {args.cfg:g}) to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def calibrate_gits(args) -> int:
    """``sdinfer calibrate --method gits``: the step costs GITS finds its time grids in."""
    from .calibrate import calibrate_grid
    from .models import artifacts

    args.points = 60 if args.points is None else args.points
    if args.points < 2:
        raise UserError(f"--points must be >= 2 for a gits grid, got {args.points}")
    pipe, out = _calibration_target(args, 16, "grids",
                                    lambda pipe: artifacts.writable_path(pipe.model.path, "gits", args.cfg))
    start = time.perf_counter()
    grid = calibrate_grid(pipe, args.cfg, calibration_prompts(args.prompts, args.samples, args.seed),
                          args.points, seed=args.seed)
    grid.save(out)
    print(f"wrote the gits grid of {pipe.model.name} at cfg {args.cfg:g} ({args.samples} teacher "
          f"trajectories, {grid.max_steps + 1} nodes) to {out} in {time.perf_counter() - start:.1f} s; "
          f"10 steps: t = {', '.join(f'{t:.3f}' for t in grid.times(min(10, grid.max_steps)))}")
    return 0


def _step_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"--step-counts takes whole numbers separated by commas, e.g. 5,6,8,10; got {text!r}") from None
    if not counts or counts[0] < 1:
        raise UserError(f"--step-counts must be whole numbers >= 1, got {text!r}")
    return counts


def calibrate_learned_grid(args) -> int:
    """``sdinfer calibrate --method learned-grid``: one sampler's grids at the given step counts,
    added to the model's learned-grid file (an existing grid is replaced only with --overwrite)."""
    import torch

    from .calibrate import calibrate_learned_grids
    from .models import artifacts
    from .pipeline import Pipeline
    from .samplers import get_sampler
    from .samplers.learned_grid import LearnedGrids, entry_key

    counts = _step_counts(args.step_counts)
    args.samples = 16 if args.samples is None else args.samples
    if args.samples < 1 or args.validation < 1:
        raise UserError(f"--samples and --validation must be >= 1 for a learned grid, got "
                        f"{args.samples} and {args.validation}")
    if args.evals < 1:
        raise UserError(f"--evals must be >= 1, got {args.evals}")
    try:
        get_sampler(args.sampler)
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet_libraries()
    pipe = Pipeline.from_pretrained(args.model)
    out = Path(args.out) if args.out else artifacts.writable_path(pipe.model.path, "learned-grid", args.cfg)
    if out.suffix != ".safetensors":
        raise UserError(f"learned grids are written as safetensors; give --out a .safetensors name, not {out}")
    grids = None
    if out.exists():
        try:
            grids = LearnedGrids.load(out)
        except ValueError as err:
            raise UserError(f"{err}; choose another --out") from None
        taken = [n for n in counts if entry_key(args.sampler, n) in grids.grids]
        if taken and not args.overwrite:
            raise UserError(f"{out} has grids for {args.sampler} at {', '.join(map(str, taken))} steps; "
                            "pass --overwrite to replace them or --out for another file")
    texts = calibration_prompts(args.prompts, args.samples + args.validation, args.seed)
    start = time.perf_counter()

    def on_grid(steps: int, info: dict, grids) -> None:
        grids.save(out)
        print(f"{args.sampler} {steps} steps: from {info['start']}, training RMS {info['train_start']:.4f} -> "
              f"{info['train_learned']:.4f} ({info['evaluations']} evaluations), validation "
              f"{info['validation_start']:.4f} -> {info['validation_learned']:.4f}: kept {info['kept']}",
              flush=True)

    calibrate_learned_grids(pipe, args.cfg, args.sampler, counts, texts[:args.samples], texts[args.samples:],
                            args.seed, args.evals, grids=grids, on_grid=on_grid)
    print(f"wrote learned grids of {pipe.model.name} at cfg {args.cfg:g} for {args.sampler} at "
          f"{', '.join(map(str, counts))} steps to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate_pipeline
    from .models import artifacts

    if args.method == "gits":
        return calibrate_gits(args)
    if args.method == "learned-grid":
        return calibrate_learned_grid(args)
    if args.method != "dpm-solver-v3":
        return calibrate_cache(args)
    args.points = 250 if args.points is None else args.points
    if args.validation < 0:
        raise UserError(f"--validation must be >= 0, got {args.validation}")
    if args.validate_only:
        return validate_statistics(args)
    pipe, out = _calibration_target(args, 64, "statistics",
                                    lambda pipe: artifacts.writable_path(pipe.model.path, "dpm-solver-v3", args.cfg))
    texts = calibration_prompts(args.prompts, args.samples + args.validation, args.seed)
    prompts, validation = texts[:args.samples], texts[args.samples:]
    start = time.perf_counter()
    ems = calibrate_pipeline(pipe, args.cfg, prompts, args.points, args.reduce, args.seed, args.smooth,
                             validation_prompts=validation)
    out.parent.mkdir(parents=True, exist_ok=True)
    ems.save(out)
    print(f"wrote DPM-Solver-v3 statistics of {pipe.model.name} at cfg {args.cfg:g} "
          f"({len(prompts)} trajectories, {args.points} points) to {out} "
          f"in {time.perf_counter() - start:.1f} s")
    _print_corrector_choice(ems.meta)
    return 0


def validate_statistics(args) -> int:
    """``sdinfer calibrate --validate-only``: choose the corrector of existing statistics again."""
    from .calibrate import validate_corrector
    from .models import artifacts
    from .samplers.ems import EMS

    if args.validation < 1:
        raise UserError(f"--validate-only needs --validation >= 1, got {args.validation}")
    if not args.overwrite:
        raise UserError("--validate-only rewrites the statistics file's corrector choice; pass --overwrite")
    pipe, out = _calibration_target(args, 64, "statistics",
                                    lambda pipe: artifacts.writable_path(pipe.model.path, "dpm-solver-v3", args.cfg),
                                    rewrite=True)
    try:
        ems = EMS.load(out)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"{err}") from None
    texts = calibration_prompts(args.prompts, args.samples + args.validation, args.seed)
    validate_corrector(pipe, ems, args.cfg, texts[args.samples:], args.seed)
    ems.save(out)
    print(f"chose the corrector of {out} again on {args.validation} validation trajectories (statistics kept)")
    _print_corrector_choice(ems.meta)
    return 0


def _print_corrector_choice(meta: dict) -> None:
    if "corrector_by_steps" not in meta:
        return
    sel = meta["corrector_selection"]
    choice = ", ".join(f"{n} {mode}" for n, mode in meta["corrector_by_steps"].items())
    errors = "; ".join(f"{mode} {', '.join(f'{v:.4f}' for v in values)}" for mode, values in sel["rms"].items())
    print(f"corrector by NFE: {choice}; RMS error on {sel['trajectories']} validation trajectories "
          f"at NFE {sel['nfe']}: {errors}")


def _check_device(name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown torch device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but this torch sees no CUDA GPU; use --device cpu")


# ---- train-default --------------------------------------------------------------------
def cmd_train_default(args) -> int:
    from .models.default.architectures import TRAIN_OVERRIDES
    from .models.default.export import export_pipeline
    from .models.default.train import TrainConfig, train

    given = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
             "restarts": args.restarts, "resolution": args.resolution, "init_from": args.init_from}
    settings = {**TRAIN_OVERRIDES[args.arch], **{k: v for k, v in given.items() if v is not None}}
    if args.restarts is None and args.steps is not None:  # a shorter run keeps the defaults that fit
        settings["restarts"] = tuple(r for r in settings.get("restarts", ()) if r < args.steps)
    try:
        cfg = TrainConfig(arch=args.arch, **settings)
    except ValueError as err:
        hint = ("give --resolution as a multiple of 4" if "resolution" in str(err)
                else "give --steps larger than the last of --restarts")
        raise UserError(f"{err}; {hint}") from None
    _check_device(args.device)
    if args.data_workers < 0:
        raise UserError(f"--data-workers must be >= 0, got {args.data_workers}")
    sized = "" if cfg.resolution == 32 else f"-{cfg.resolution}"
    run_dir = Path(args.run_dir or f"runs/default-{args.arch}{sized}")
    _quiet_libraries()
    trainer = train(cfg, run_dir, max_minutes=args.max_minutes, threads=args.threads,
                    device=args.device, data_workers=args.data_workers)
    if trainer.step >= cfg.steps:
        out = Path(args.export_to or run_dir / "model")
        export_pipeline(trainer, out)
        print(f"trained {cfg.steps} steps; wrote the model to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdinfer", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate images with diffusion models faster, and measure by how much and "
                    "at what cost in quality. Runs offline on the shipped default models "
                    "(32x32 shapes, two of them also fine-tuned at 64x64) or on diffusers pipelines saved on disk.",
        epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p, many_steps=False):
        p.add_argument("--model", default="default",
                       help="default | unet | dit | unet-64 | dit-64 (the two fine-tuned at 64x64) | PATH to a diffusers "
                            "pipeline folder (default: default, the shipped UNet)")
        p.add_argument("--sampler", default="ddim",
                       help="sampler with options, e.g. ddim, ddim:eta=1, ddpm, plms, dpm-solver++:order=3, "
                            "dpm-solver, unipc, euler, heun (default: ddim)")
        if many_steps:
            p.add_argument("--steps", default="50", help="denoising steps; several as 10,20,50 (default: 50)")
        else:
            p.add_argument("--steps", type=_steps_or_auto, default=50,
                           help="denoising steps, or auto: StepSaver predicts them per prompt (default: 50)")
        p.add_argument("--cfg", type=float, default=4.0,
                       help="classifier-free guidance scale; 1 turns guidance off (default: 4)")
        p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
        p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's own)")

    g = sub.add_parser("generate", help="generate an image from a prompt",
                       description="Generate an image from a text prompt and write it as PNG "
                                   "(the generation parameters go into the PNG's text metadata).")
    g.add_argument("prompt", help='what to draw, e.g. "a red circle in the top left"')
    g.add_argument("-o", "--output", default="out.png", help="PNG file to write (default: out.png)")
    common(g)
    g.add_argument("--batch", type=int, default=1,
                   help="images to generate (seeds SEED, SEED+1, ...; files OUT-0.png, OUT-1.png, ...)")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g.add_argument("--predictor", default=None,
                   help="StepSaver predictor for --steps auto (default: the one beside the model)")
    g.add_argument("--spacing", default=None,
                   help="time grid: trailing, leading, linspace, karras, logsnr, time_uniform, "
                        "time_quadratic, gits (the optimal grid calibrated for the model at this "
                        "--cfg: sdinfer calibrate --method gits), or learned (the grid learned for this "
                        "sampler and step count: sdinfer calibrate --method learned-grid) "
                        "(default: the sampler's own)")
    g.add_argument("--analytic-first-step", action="store_true",
                   help="take the first step from the Gaussian-data prediction instead of a model call "
                        "(GENIE / GITS): --steps N costs N - 1 evaluations")
    g.add_argument("--final", default="zero", choices=("zero", "sigma_min"),
                   help="where the last step lands: zero (clean data) or sigma_min (the first training "
                        "step, as diffusers' DDIM; the trailing grid only) (default: zero)")
    g.add_argument("--accelerate", default=None, metavar="SPEC",
                   help="feature cache to install, e.g. deepcache:interval=3 (UNets) or fora:interval=3 "
                        "(transformers); several joined by +")
    g.add_argument("--parallel", default=None, metavar="SPEC",
                   help="run on several ranks (torch.distributed). Exact: cfg (the guidance branches on 2 "
                        "ranks), ulysses or ring (a transformer's image tokens split over the ranks). Stale "
                        "(faster, approximate after warmup_steps): distrifusion (UNet image patches), "
                        "pipefusion (transformer layers and patches pipelined), asyncdiff (the model's "
                        "blocks split into components; asyncdiff:stride=2 on one rank more advances two steps a "
                        "round). Options as NAME:key=value, e.g. asyncdiff:warmup_steps=3")
    g.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="with --parallel: start N ranks on this machine (under torchrun leave it out)")
    g.add_argument("--backend", default="gloo",
                   help="torch.distributed backend of the ranks (default: gloo; generate runs on the CPU)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="measure configurations against a baseline",
                       description="Run configurations and their baseline over a prompt set and "
                                   "report NFE, MACs, wall time, memory, PSNR/SSIM against the "
                                   "baseline, prompt adherence and speed-ups.")
    common(b, many_steps=True)
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
    b.add_argument("--json", default=None, help="write the records to this JSON file")
    b.add_argument("--plot", default=None, help="write a quality-vs-speed-up plot to this PNG file")
    b.add_argument("--min-steps", action="store_true",
                   help="StepSaver: per prompt, the fewest of --steps within --threshold dB PSNR "
                        "of the baseline's image")
    b.add_argument("--threshold", type=float, default=30.0, help="PSNR threshold in dB for --min-steps (default: 30)")
    b.add_argument("--save-predictor", default=None,
                   help="with --min-steps: fit a step predictor on the labels and save it here "
                        "(use it with generate --steps auto --predictor PATH)")
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser("models", help="list the shipped models")
    m.set_defaults(func=cmd_models)

    c = sub.add_parser("calibrate", help="learn a model's statistics for DPM-Solver-v3 or a cache method",
                       description="Record what an accelerator learns from the model and save it beside "
                                   "the model (or to --out), where the accelerator finds it: "
                                   "DPM-Solver-v3's empirical model statistics at one guidance scale "
                                   "(the default), GITS's optimal time grid (--method gits), one "
                                   "sampler's learned time grids (--method learned-grid), or a cache "
                                   "method's calibration (--method teacache, ...), recorded on --samples "
                                   "training-like prompts.")
    c.add_argument("--method", default="dpm-solver-v3",
                   help="dpm-solver-v3, gits (an optimal time grid: generate --spacing gits), "
                        "learned-grid (one sampler's grids learned on its global error: generate "
                        "--spacing learned), or a cache method that calibrates (default: dpm-solver-v3)")
    c.add_argument("--model", default="default", help="default | unet | dit | unet-64 | dit-64 | PATH (default: default)")
    c.add_argument("--cfg", type=float, default=4.0, help="guidance scale the statistics are for (default: 4)")
    c.add_argument("--prompts", default="train",
                   help="train (captions like the default models' training data) | quick | FILE")
    c.add_argument("--samples", type=int, default=None,
                   help="trajectories (default: 64 for dpm-solver-v3, 16 for gits, learned-grid or a cache)")
    c.add_argument("--steps", type=int, default=50, help="cache methods: sampling steps (default: 50)")
    c.add_argument("--sampler", default="ddim", help="cache methods and learned-grid: sampler (default: ddim)")
    c.add_argument("--step-counts", default="5,6,8,10,12",
                   help="learned-grid: the step counts to learn grids for; each is saved when done "
                        "(default: 5,6,8,10,12)")
    c.add_argument("--evals", type=int, default=150,
                   help="learned-grid: most trial grids per step count (default: 150)")
    c.add_argument("--points", type=int, default=None,
                   help="dpm-solver-v3: lambda grid points (default: 250); gits: fine-grid points "
                        "per family, uniform in t and in log-SNR (default: 60)")
    c.add_argument("--reduce", default="channel", choices=["channel", "all", "none"],
                   help="average statistics over each channel's pixels, over all, or not (default: channel)")
    c.add_argument("--smooth", type=float, default=0.1,
                   help="width in log-SNR of the Gaussian that smooths the statistics; 0: none (default: 0.1)")
    c.add_argument("--validation", type=int, default=8,
                   help="further trajectories on which to choose dpm-solver-v3's corrector mode per NFE "
                        "(on, half, off; 0: keep it on), or on which a learned grid must beat its start (default: 8)")
    c.add_argument("--validate-only", action="store_true",
                   help="dpm-solver-v3: choose the corrector modes of the existing statistics file again on "
                        "--validation trajectories (needs --overwrite; the statistics are kept)")
    c.add_argument("--seed", type=int, default=0, help="seed of noise and probes (default: 0)")
    c.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    c.add_argument("--out", default=None,
                   help="file to write (default: MODEL/sdinfer_calibration/METHOD-cfgCFG.safetensors for "
                        "dpm-solver-v3, gits and learned-grid (learned grids are added to it), "
                        "MODEL/sdinfer_calibration/METHOD.safetensors for a cache)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing statistics file (learned-grid: existing grids of the same "
                        "sampler and step counts)")
    c.set_defaults(func=cmd_calibrate)

    t = sub.add_parser("train-default", help="train a default model on the shapes data (resumable)",
                       description="Train a default model from scratch, seeded; interrupted runs "
                                   "resume from their last checkpoint when the command is repeated.")
    t.add_argument("--arch", choices=["unet", "dit"], required=True)
    t.add_argument("--steps", type=int, default=None,
                   help="training steps (default: unet 8500, dit 8100: models/default/architectures.py)")
    t.add_argument("--batch-size", type=int, default=None, help="images per step (default: unet 32, dit 128)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3)")
    t.add_argument("--seed", type=int, default=None, help="seed of data, noise and weights (default: 0)")
    t.add_argument("--restarts", type=_whole_number, nargs="*", default=None,
                   help="steps at which the learning-rate schedule restarts (extends a finished run)")
    t.add_argument("--resolution", type=int, default=None,
                   help="image side to train at, a multiple of 4 (default: 32)")
    t.add_argument("--init-from", default=None,
                   help="start from this model's weights (a shipped model name or a pipeline folder "
                        "of the same architecture), e.g. to fine-tune at another --resolution "
                        "(default: fresh weights)")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    t.add_argument("--device", default="cpu", help="torch device to train on, e.g. cuda (default: cpu)")
    t.add_argument("--data-workers", type=int, default=0,
                   help="processes that render batches ahead of the training step (default: 0)")
    t.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this long")
    t.add_argument("--run-dir", default=None, help="checkpoint folder (default: runs/default-ARCH, or runs/default-ARCH-RESOLUTION)")
    t.add_argument("--export-to", default=None, help="where to write the finished model (default: RUN_DIR/model)")
    t.set_defaults(func=cmd_train_default)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # what --world-size's ranks re-run
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as err:
        print(f"sdinfer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdinfer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
