"""``sdinfer train-default``: train a default model on the shapes data, resumably."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .options import quiet_libraries, whole_number


def add_parser(sub) -> None:
    t = sub.add_parser("train-default", help="train a default model on the shapes data (resumable)",
                       description="Train a default model from scratch, seeded; interrupted runs "
                                   "resume from their last checkpoint when the command is repeated.")
    t.add_argument("--arch", choices=["unet", "dit"], required=True)
    t.add_argument("--steps", type=int, default=None,
                   help="training steps (default: unet 8500, dit 8100: models/default/architectures.py)")
    t.add_argument("--batch-size", type=int, default=None, help="images per step (default: unet 32, dit 128)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3)")
    t.add_argument("--seed", type=int, default=None, help="seed of data, noise and weights (default: 0)")
    t.add_argument("--restarts", type=whole_number, nargs="*", default=None,
                   help="steps at which the learning-rate schedule restarts (extends a finished run)")
    t.add_argument("--resolution", type=int, default=None,
                   help="image side to train at, a multiple of 4 (default: 32)")
    t.add_argument("--init-from", default=None,
                   help="start from this model's weights (a shipped model name or a pipeline folder "
                        "of the same architecture), e.g. to fine-tune at another --resolution "
                        "(default: fresh weights)")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    t.add_argument("--device", default="cpu",
                   help="torch device to train on: cpu, cuda, cuda:N or mps (default: cpu)")
    t.add_argument("--data-workers", type=int, default=0,
                   help="processes that render batches ahead of the training step (default: 0)")
    t.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this long")
    t.add_argument("--run-dir", default=None,
                   help="checkpoint folder (default: runs/default-ARCH, or runs/default-ARCH-RESOLUTION)")
    t.add_argument("--export-to", default=None, help="where to write the finished model (default: RUN_DIR/model)")
    t.set_defaults(func=run)


def run(args) -> int:
    from ..devices import resolve_device
    from ..models.default.architectures import TRAIN_OVERRIDES
    from ..models.default.export import export_pipeline
    from ..models.default.train import TrainConfig, train

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
    resolve_device(args.device)
    if args.data_workers < 0:
        raise UserError(f"--data-workers must be >= 0, got {args.data_workers}")
    sized = "" if cfg.resolution == 32 else f"-{cfg.resolution}"
    run_dir = Path(args.run_dir or f"runs/default-{args.arch}{sized}")
    quiet_libraries()
    trainer = train(cfg, run_dir, max_minutes=args.max_minutes, threads=args.threads,
                    device=args.device, data_workers=args.data_workers)
    if trainer.step >= cfg.steps:
        out = Path(args.export_to or run_dir / "model")
        export_pipeline(trainer, out)
        print(f"trained {cfg.steps} steps; wrote the model to {out}")
    return 0
