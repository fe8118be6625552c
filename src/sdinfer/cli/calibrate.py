"""``sdinfer calibrate PROCEDURE``: what an accelerator learns from a model, saved beside it.

One subcommand per procedure, each with its own options: ``dpm-solver-v3`` (the solver's
empirical model statistics), ``gits`` (GITS's optimal time grid), ``learned-grid`` (one sampler's
learned time grids), ``auto`` (the per-NFE choice ``--sampler auto`` runs) and one per cache method that registers a calibrator in
``sdinfer.cache.calibration`` (their names are read from there when ``calibrate`` runs).
The older spelling ``calibrate --method NAME`` (no method: dpm-solver-v3) is rewritten to
``calibrate NAME`` by ``alias_argv``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import UserError
from .options import MODEL_HELP, add_device_options, load_pipeline



def alias_argv(argv: list[str]) -> list[str]:
    """``calibrate [--method NAME] OPTIONS`` -> ``calibrate NAME OPTIONS`` (NAME: dpm-solver-v3
    when not given); a subcommand given first, or ``calibrate --help``, is left as it is."""
    if not argv or argv[0] != "calibrate":
        return argv
    rest = argv[1:]
    if rest and (not rest[0].startswith("-") or rest[0] in ("-h", "--help")):
        return argv
    method, kept, i = "dpm-solver-v3", [], 0
    while i < len(rest):
        token = rest[i]
        if token == "--method" and i + 1 < len(rest):
            method, i = rest[i + 1], i + 2
            continue
        if token.startswith("--method="):
            method = token.split("=", 1)[1]
        else:
            kept.append(token)
        i += 1
    return ["calibrate", method, *kept]


class Procedures(argparse._SubParsersAction):
    """The subcommands of ``calibrate``; ``check`` makes an unknown one a UserError naming those
    there are (the parser calls it in place of argparse's "invalid choice")."""

    def check(self, name: str) -> None:
        if name not in self._name_parser_map:
            raise UserError(f"unknown calibration method {name!r}; available: "
                            f"{', '.join(self._name_parser_map)}")


def add_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("calibrate", help="learn a model's statistics for DPM-Solver-v3, a time grid, or a "
                                         "cache method's calibration",
                       description="Record what an accelerator learns from the model and save it beside "
                                   "the model (or to --out), where the accelerator finds it, recorded on "
                                   "--samples training-like prompts. One subcommand per procedure; "
                                   "`sdinfer calibrate PROCEDURE --help` lists its options. The older "
                                   "`sdinfer calibrate --method NAME ...` still works (no NAME: dpm-solver-v3).")
    procs = c.add_subparsers(dest="method", metavar="PROCEDURE", action=Procedures, prog="sdinfer calibrate")
    _add_dpm_solver_v3(procs)
    _add_gits(procs)
    _add_learned_grid(procs)
    _add_auto(procs)
    _add_ditfastattn(procs)
    return c


def add_cache_procedures(calibrate_parser: argparse.ArgumentParser) -> None:
    """One subcommand per cache method that calibrates (imports the cache package, and torch)."""
    from ..cache import calibration

    procs = next(a for a in calibrate_parser._actions if isinstance(a, Procedures))
    for method, calibrator in sorted(calibration.CALIBRATORS.items()):
        if method in procs._name_parser_map:
            continue
        paper = _first_sentence(sys.modules[calibrator.__module__].__doc__) or method
        p = procs.add_parser(method, help=f"cache: {paper}",
                             description=f"The calibration of the cache {method}: {paper}, written by "
                                         f"default to DENOISER/sdinfer_calibration/{method}.safetensors.")
        _add_common(p, samples=16)
        p.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
        p.add_argument("--sampler", default="ddim", help="sampler (default: ddim)")
        p.set_defaults(func=calibrate_cache)


def _first_sentence(doc: str | None) -> str:
    """A module docstring's opening, up to its first ")." (the paper it names)."""
    text = " ".join((doc or "").split())
    end = text.find(").")
    return text[:end + 1] if end > 0 else text.split(". ")[0]


def _add_common(p, samples: int) -> None:
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale the calibration is for (default: 4)")
    p.add_argument("--prompts", default="train",
                   help="train (captions like the default models' training data) | quick | FILE")
    p.add_argument("--samples", type=int, default=samples, help=f"trajectories (default: {samples})")
    p.add_argument("--seed", type=int, default=0, help="seed of noise and probes (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_device_options(p)
    p.add_argument("--out", default=None, help="file to write (default: MODEL/sdinfer_calibration/METHOD[-cfgCFG].safetensors, where "
                   "it is found)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")


def _add_dpm_solver_v3(procs) -> None:
    p = procs.add_parser("dpm-solver-v3", help="DPM-Solver-v3's empirical model statistics at one guidance scale",
                         description="DPM-Solver-v3's empirical model statistics (EMS) at one guidance scale, "
                                     "written by default to MODEL/dpm_solver_v3/cfgCFG.safetensors.")
    _add_common(p, samples=64)
    p.add_argument("--points", type=int, default=250, help="lambda grid points (default: 250)")
    p.add_argument("--reduce", default="channel", choices=["channel", "all", "none"],
                   help="average statistics over each channel's pixels, over all, or not (default: channel)")
    p.add_argument("--smooth", type=float, default=0.1,
                   help="width in log-SNR of the Gaussian that smooths the statistics; 0: none (default: 0.1)")
    p.add_argument("--validation", type=int, default=8,
                   help="further trajectories on which to choose the corrector mode per NFE (on, half, off; "
                        "0: keep it on) (default: 8)")
    p.add_argument("--validate-only", action="store_true",
                   help="choose the corrector modes of the existing statistics file again on --validation "
                        "trajectories (needs --overwrite; the statistics are kept)")
    p.set_defaults(func=calibrate_dpm_solver_v3)


def _add_gits(procs) -> None:
    p = procs.add_parser("gits", help="GITS's optimal time grid (generate --spacing gits)",
                         description="The step costs GITS finds its optimal time grids in, at one guidance "
                                     "scale, written by default to MODEL/gits/cfgCFG.safetensors "
                                     "(use with generate --spacing gits).")
    _add_common(p, samples=16)
    p.add_argument("--points", type=int, default=60,
                   help="fine-grid points per family, uniform in t and in log-SNR (default: 60)")
    p.set_defaults(func=calibrate_gits)


def _add_learned_grid(procs) -> None:
    p = procs.add_parser("learned-grid", help="one sampler's time grids learned on its global error "
                                              "(generate --spacing learned)",
                         description="One sampler's time grids at the given step counts, learned on its "
                                     "global error, added to MODEL/learned_grid/cfgCFG.safetensors by default "
                                     "(use with generate --spacing learned).")
    _add_common(p, samples=16)
    p.add_argument("--sampler", default="ddim", help="sampler the grids are for (default: ddim)")
    p.add_argument("--step-counts", default="5,6,8,10,12",
                   help="the step counts to learn grids for; each is saved when done (default: 5,6,8,10,12)")
    p.add_argument("--evals", type=int, default=150, help="most trial grids per step count (default: 150)")
    p.add_argument("--validation", type=int, default=8,
                   help="further trajectories on which a learned grid must beat its start (default: 8)")
    p.set_defaults(func=calibrate_learned_grid)


def _add_auto(procs) -> None:
    p = procs.add_parser("auto", help="the per-NFE sampler choice that --sampler auto runs",
                         description="Score the candidate samplers x time grids (DPM-Solver++(2M/3M), UniPC-2/3, "
                                     "DPM-Solver-v3's corrector modes; trailing, logsnr and GITS grids; the analytic "
                                     "first step) at each NFE on --validation trajectories against an accurate "
                                     "reference, and keep per NFE the lowest trimmed error, written by default to "
                                     "MODEL/sdinfer_calibration/auto-sampler-cfgCFG.safetensors (use with generate "
                                     "--sampler auto). DPM-Solver-v3's statistics and the GITS grid are calibrated "
                                     "first on --samples trajectories where the model has none.")
    _add_common(p, samples=32)
    p.add_argument("--validation", type=int, default=32,
                   help="validation trajectories the choice is made on (default: 32)")
    p.add_argument("--nfes", default="5-20", help="NFEs to choose for: A-B or a comma list (default: 5-20)")
    p.add_argument("--trim", type=float, default=0.05,
                   help="share of the worst validation trajectories the score leaves out (default: 0.05)")
    p.add_argument("--reference-steps", type=int, default=400,
                   help="DPM-Solver++(3M) log-SNR steps of the reference solution (default: 400)")
    p.set_defaults(func=calibrate_auto)


def _add_ditfastattn(procs) -> None:
    p = procs.add_parser("ditfastattn", help="cache: DiTFastAttn's per-layer, per-step attention plan",
                         description="DiTFastAttn (Yuan et al., NeurIPS 2024): for each self-attention layer and "
                                     "step the cheapest of output sharing, window attention with residual sharing "
                                     "and CFG sharing whose relative output error stays under the threshold, "
                                     "chosen greedily on --samples training-like prompts (one generation per "
                                     "window size and threshold), written by default to "
                                     "MODEL/sdinfer_calibration/ditfastattn.safetensors (use with --accelerate "
                                     "ditfastattn:threshold=T,window_size=W).")
    _add_common(p, samples=8)
    p.add_argument("--steps", default="50",
                   help="sampling step counts the plans are for, one plan each, e.g. 20,50 (default: 50)")
    p.add_argument("--sampler", default="ddim", help="sampler (default: ddim)")
    p.add_argument("--thresholds", default="0.01,0.025,0.05,0.075,0.1",
                   help="relative output errors, one plan each (default: 0.01,0.025,0.05,0.075,0.1)")
    p.add_argument("--window-sizes", default="128", help="window sizes in tokens, one plan each (default: 128)")
    p.set_defaults(func=calibrate_ditfastattn)


def _numbers(flag: str, text: str, kind: type) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} takes {'whole ' if kind is int else ''}numbers separated by commas; got {text!r}") from None
    if not values:
        raise UserError(f"{flag} needs at least one value")
    return values


def calibrate_ditfastattn(args) -> int:
    """``sdinfer calibrate ditfastattn``: DiTFastAttn's plans for the given windows and thresholds."""
    from ..cache import ditfastattn
    from ..models import artifacts

    settings = ditfastattn.CalibrationSettings(
        _numbers("--thresholds", args.thresholds, float), _numbers("--window-sizes", args.window_sizes, int),
        steps=_numbers("--steps", args.steps, int), sampler=args.sampler, guidance_scale=args.cfg, seed=args.seed)
    if not 1 <= args.samples <= 64:
        raise UserError(f"--samples runs as one batch; give 1-64 prompts (the paper: 4-8), got {args.samples}")
    pipe, out = _calibration_target(args, "plans",
                                    lambda pipe: artifacts.writable_path(pipe.model.path, ditfastattn.METHOD))
    start = time.perf_counter()
    plans = ditfastattn.calibrate_pipeline(pipe, calibration_prompts(args.prompts, args.samples, args.seed),
                                           settings, log=lambda line: print(line, flush=True))
    ditfastattn.save_plans(out, plans, {"sampler": args.sampler, "guidance_scale": args.cfg,
                                        "prompts": args.samples, "seed": args.seed})
    print(f"wrote {len(plans)} ditfastattn plans of {pipe.model.name} ({args.samples} prompts, {args.sampler} "
          f"{args.steps} steps, cfg {args.cfg:g}) to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def _nfes(text: str) -> list[int]:
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-", 1))
            values = list(range(lo, hi + 1))
        else:
            values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"--nfes takes A-B or whole numbers separated by commas, e.g. 5-20 or 5,8,10; got {text!r}") from None
    if not values or values[0] < 2:
        raise UserError(f"--nfes must be whole numbers >= 2, got {text!r}")
    return values


def calibrate_auto(args) -> int:
    """``sdinfer calibrate auto``: the auto-sampler table at one guidance scale."""
    from ..auto_sampler import ARTIFACT, calibrate_auto as run
    from ..models import artifacts

    nfes = _nfes(args.nfes)
    if args.validation < 1:
        raise UserError(f"--validation must be >= 1, got {args.validation}")
    if not 0 <= args.trim < 0.5:
        raise UserError(f"--trim must be in [0, 0.5), got {args.trim}")
    if args.reference_steps < 20:
        raise UserError(f"--reference-steps must be >= 20, got {args.reference_steps}")
    pipe, out = _calibration_target(
        args, "auto-sampler tables", lambda pipe: artifacts.writable_path(pipe.model.path, ARTIFACT, args.cfg))
    texts = calibration_prompts(args.prompts, args.samples + args.validation, args.seed)
    start = time.perf_counter()
    table = run(pipe, args.cfg, texts[:args.samples], texts[args.samples:], args.seed, nfes, trim=args.trim,
                reference_steps=args.reference_steps, log=lambda line: print(line, flush=True))
    table.save(out)
    print(f"wrote the auto-sampler table of {pipe.model.name} at cfg {args.cfg:g} ({args.validation} validation "
          f"trajectories) to {out} in {time.perf_counter() - start:.1f} s")
    for nfe, e in sorted(table.entries.items()):
        print(f"  NFE {nfe}: {e['sampler']} [{e['spacing']}]{' +afs' if e['analytic_first_step'] else ''}: "
              f"{e['score']:.4f} (90% {e['interval'][0]:.4f}-{e['interval'][1]:.4f}, chosen on "
              f"{e['stability']:.0%} of resamples)")
    return 0


# ---- the procedures ----------------------------------------------------------------
def calibration_prompts(spec: str, count: int, seed: int) -> list[str]:
    from ..eval.prompts import load_prompts
    from ..models.default import shapes

    if spec == "train":  # captions the default models were trained on, never held-out ones
        specs = shapes.sample_specs(count, 10**6 + seed, set(shapes.heldout_prompts()))
        return [s.caption for s in specs]
    base = load_prompts(spec)
    return [base[i % len(base)] for i in range(count)]


def _load(args):
    """The pipeline to calibrate, after the options every procedure shares are checked."""
    if args.samples < 1:
        raise UserError(f"--samples must be >= 1, got {args.samples}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return load_pipeline(args)


def _calibration_target(args, what: str, default_out, rewrite: bool = False):
    """The pipeline to calibrate and the file to write (checked before any work is done);
    ``rewrite``: the file is one to update, not a new one."""
    pipe = _load(args)
    out = Path(args.out) if args.out else default_out(pipe)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it or --out for another file")
    if rewrite and not out.is_file():
        raise UserError(f"there is no {out} to update; calibrate first or give --out")
    if out.suffix != ".safetensors":
        raise UserError(f"{what} are written as safetensors; give --out a .safetensors name, not {out}")
    return pipe, out


def calibrate_cache(args) -> int:
    """``sdinfer calibrate CACHE``: record a cache method's calibration beside the model."""
    from ..cache import calibration
    from ..models import artifacts

    if args.steps < 2:
        raise UserError(f"--steps must be >= 2 for a cache calibration, got {args.steps}")
    pipe, out = _calibration_target(args, "calibrations",
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
    """``sdinfer calibrate gits``: the step costs GITS finds its time grids in."""
    from ..calibrate import calibrate_grid
    from ..models import artifacts

    if args.points < 2:
        raise UserError(f"--points must be >= 2 for a gits grid, got {args.points}")
    pipe, out = _calibration_target(
        args, "grids", lambda pipe: artifacts.writable_path(pipe.model.path, "gits", args.cfg))
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
    """``sdinfer calibrate learned-grid``: one sampler's grids at the given step counts, added to
    the model's learned-grid file (an existing grid is replaced only with --overwrite)."""
    from ..calibrate import calibrate_learned_grids
    from ..models import artifacts
    from ..samplers import get_sampler
    from ..samplers.learned_grid import LearnedGrids, entry_key

    counts = _step_counts(args.step_counts)
    if args.samples < 1 or args.validation < 1:
        raise UserError(f"--samples and --validation must be >= 1 for a learned grid, got "
                        f"{args.samples} and {args.validation}")
    if args.evals < 1:
        raise UserError(f"--evals must be >= 1, got {args.evals}")
    try:
        get_sampler(args.sampler)
    except ValueError as err:
        raise UserError(str(err)) from None
    pipe = _load(args)
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


def calibrate_dpm_solver_v3(args) -> int:
    """``sdinfer calibrate dpm-solver-v3``: the solver's statistics at one guidance scale."""
    from ..calibrate import calibrate_pipeline
    from ..models import artifacts

    if args.validation < 0:
        raise UserError(f"--validation must be >= 0, got {args.validation}")
    if args.validate_only:
        return validate_statistics(args)
    pipe, out = _calibration_target(
        args, "statistics", lambda pipe: artifacts.writable_path(pipe.model.path, "dpm-solver-v3", args.cfg))
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
    """``sdinfer calibrate dpm-solver-v3 --validate-only``: choose the corrector of existing
    statistics again."""
    from ..calibrate import validate_corrector
    from ..models import artifacts
    from ..samplers.ems import EMS

    if args.validation < 1:
        raise UserError(f"--validate-only needs --validation >= 1, got {args.validation}")
    if not args.overwrite:
        raise UserError("--validate-only rewrites the statistics file's corrector choice; pass --overwrite")
    pipe, out = _calibration_target(
        args, "statistics", lambda pipe: artifacts.writable_path(pipe.model.path, "dpm-solver-v3", args.cfg),
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
    plus_plus = [n for n, v in meta.get("variant_by_steps", {}).items() if v == "dpm-solver++"]
    if "dpm-solver++ rms" in sel:
        errors += f"; dpm-solver++ {', '.join(f'{v:.4f}' for v in sel['dpm-solver++ rms'])}"
    print(f"corrector by NFE: {choice}; RMS error on {sel['trajectories']} validation trajectories "
          f"at NFE {sel['nfe']}: {errors}; DPM-Solver++(2M) runs instead at NFE "
          f"{', '.join(plus_plus) if plus_plus else 'none'} (it won there)")
