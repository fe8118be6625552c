"""``sdinfer generate``: one prompt to PNG files, on one rank or several (``--parallel``)."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

from ..errors import UserError
from .options import (add_model_options, check_outputs, load_pipeline, output_paths, resolve_device_options,
                      save_png)


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate an image from a prompt",
                       description="Generate an image from a text prompt and write it as PNG "
                                   "(the generation parameters go into the PNG's text metadata).")
    g.add_argument("prompt", help='what to draw, e.g. "a red circle in the top left"')
    g.add_argument("-o", "--output", default="out.png", help="PNG file to write (default: out.png)")
    add_model_options(g)
    g.add_argument("--batch", type=int, default=1,
                   help="images to generate (seeds SEED, SEED+1, ...; files OUT-0.png, OUT-1.png, ...)")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g.add_argument("--predictor", default=None,
                   help="StepSaver predictor for --steps auto (default: the one beside the model)")
    g.add_argument("--spacing", default=None,
                   help="time grid: trailing, leading, linspace, karras, logsnr, time_uniform, "
                        "time_quadratic, gits (the optimal grid calibrated for the model at this "
                        "--cfg: sdinfer calibrate gits), or learned (the grid learned for this "
                        "sampler and step count: sdinfer calibrate learned-grid) "
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
    g.add_argument("--backend", default=None,
                   help="torch.distributed backend of the ranks (default: gloo on the CPU, nccl when each "
                        "rank has a GPU of its own)")
    g.add_argument("--preset", default=None, metavar="FILE",
                   help="run a preset of sdinfer tune (its model, sampler, steps, grid, first step, cache and "
                        "--cfg); a flag given explicitly overrides the preset's value, with a note")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=run)


def generation_config(args):
    """The generation options of the flags, checked before any model loads."""
    from ..generation_config import GenerationConfig

    return GenerationConfig(steps=args.steps, sampler=args.sampler, guidance_scale=args.cfg, seed=args.seed,
                            size=args.size, spacing=args.spacing, analytic_first_step=args.analytic_first_step,
                            final=args.final)


def run(args) -> int:
    from .options import PRESET_FLAGS, apply_preset

    apply_preset(args, PRESET_FLAGS, lambda m: print(m, file=sys.stderr))
    if args.parallel or args.world_size is not None:
        return _generate_parallel(args)
    return _generate(args)


def _generate(args, setup=None, rank: int = 0) -> int:
    """Generate and (on rank 0) write; ``setup(pipe)`` installs a parallel strategy."""
    from .. import __version__

    outputs = output_paths(Path(args.output), args.batch)
    if rank == 0:
        check_outputs(outputs, args.overwrite)
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    resolve_device_options(args)
    config = generation_config(args)
    start = time.perf_counter()
    pipe = load_pipeline(args)
    if setup is not None:
        setup(pipe)   # the parallel strategy goes on first: caches check that they fit it
    if args.accelerate:
        from ..accelerate import accelerate

        accelerate(pipe, args.accelerate)
    loaded = time.perf_counter() - start
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pipe([args.prompt] * args.batch, config=config, progress=not args.quiet and rank == 0,
                      predictor=args.predictor)
    if rank != 0:
        return 0
    if args.accelerate:
        result.params["accelerate"] = args.accelerate
    if args.parallel:
        result.params["parallel"] = args.parallel
    if args.device != "cpu":
        result.params["device"] = args.device
    if args.dtype != "float32":
        result.params["dtype"] = args.dtype
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    for i, (image, path) in enumerate(zip(result.images, outputs)):
        meta = {"prompt": args.prompt, **result.params, "seed": args.seed + i,
                "software": f"sdinfer {__version__}"}
        meta["parameters"] = ", ".join(f"{k}: {v}" for k, v in meta.items())
        try:
            save_png(image, path, meta)
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
    from ..parallel import launch

    info = launch.RankInfo.from_env()
    world = _check_parallel(args, info)
    if info is None:
        check_outputs(output_paths(Path(args.output), args.batch), args.overwrite)
        codes = launch.launch_local([sys.executable, "-m", "sdinfer", *args.argv], world)
        return launch.exit_code(codes)
    return launch.run_rank(lambda: _generate_rank(args, info), info.rank)


def _check_parallel(args, info) -> int:
    """The world size, once the flags are known to fit together (before any rank starts)."""
    from ..parallel import launch, parse_spec

    if not args.parallel:
        raise UserError("--world-size goes with --parallel SPEC, e.g. --parallel cfg --world-size 2")
    config = parse_spec(args.parallel)
    if args.accelerate:
        _check_caches_under(args.accelerate, args.parallel)
    if getattr(config, "needs_guidance", False) and args.cfg == 1:
        raise UserError(f"--parallel {args.parallel} splits the guidance branches and --cfg 1 turns guidance "
                        "off; use a --cfg other than 1, or another strategy")
    device, _ = resolve_device_options(args)
    if args.backend is not None and launch.check_backend(args.backend) == "nccl" and device.type != "cuda":
        raise UserError(f"--backend nccl carries CUDA tensors only and the model runs on {device}; "
                        "use --backend gloo, or --device cuda")
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
    from .. import cache
    from ..parallel import cache_refusal, parse_spec, strategy_of

    strategy = strategy_of(parse_spec(strategy_spec))
    for item in filter(None, (part.strip() for part in spec.split("+"))):
        try:
            reason = cache_refusal(strategy, cache.method_of(cache.parse_spec(item)))
        except ValueError as err:
            raise UserError(str(err)) from None
        if reason:
            raise UserError(f"--accelerate {item}: {reason}")


def _generate_rank(args, info) -> int:
    from ..devices import rank_device
    from ..parallel import apply, launch

    device = rank_device(resolve_device_options(args)[0], info.local_rank)
    args.device = str(device)   # each rank its own GPU (cuda:LOCAL_RANK); the CPU stays the CPU
    launch.init_process_group(args.backend, info=info, device=device)
    return _generate(args, setup=lambda pipe: apply(pipe, args.parallel), rank=info.rank)
