"""``sdinfer distill early-exit``: the time-dependent early exit of ASE (``distill/early_exit.py``):
measure the schedule, fine-tune the denoiser against itself, write the weights beside the model."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .options import quiet_libraries


def add_parser(sub) -> None:
    p = sub.add_parser("early-exit", help="skip a time-dependent number of blocks, fine-tuned (ASE; resumable)",
                       description="Measure which blocks each noise level can do without, derive the schedule "
                                   "under a compute budget, fine-tune the denoiser by distillation from itself "
                                   "and write MODEL/sdinfer_calibration/early-exit.safetensors (for "
                                   "--accelerate early-exit).  A repeated command resumes the run.")
    p.add_argument("--model", required=True, help="a shipped model name (dit, unet) or a pipeline folder")
    p.add_argument("--schedule", default="", help="skipped units per equal time bucket, clean to noise, e.g. "
                                                  "2/2/1/0 (default: derived from measurement under --budget)")
    p.add_argument("--budget", type=float, default=0.3, help="mean fraction of the units' MACs saved (default 0.3)")
    p.add_argument("--buckets", type=int, default=10, help="time buckets of a derived schedule (default 10)")
    p.add_argument("--max-skip", type=int, default=-1, help="most units skipped at any t (default: all but one)")
    p.add_argument("--steps", type=int, default=1000, help="fine-tuning steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--full-weight", type=float, default=0.0,
                   help="weight of the un-truncated output's distillation at every t (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this long")
    p.add_argument("--run-dir", default=None, help="checkpoint folder (default: runs/early-exit-MODEL)")
    p.add_argument("--out", default=None,
                   help="weights file to write (default: MODEL/sdinfer_calibration/early-exit.safetensors)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..distill.early_exit import METHOD
    from ..distill.early_exit_train import EarlyExitTrainConfig, train
    from ..models import artifacts
    from ..models.loading import resolve

    if not 0 <= args.budget < 1:
        raise UserError(f"--budget must be a fraction in [0, 1), got {args.budget}")
    for flag, value, least in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                               ("--buckets", args.buckets, 1)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    cfg = EarlyExitTrainConfig(model=args.model, schedule=args.schedule, budget=args.budget, buckets=args.buckets,
                               max_skip=args.max_skip, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               full_weight=args.full_weight, seed=args.seed)
    _, folder = resolve(args.model)
    run_dir = Path(args.run_dir or f"runs/early-exit-{Path(args.model).name}")
    quiet_libraries()
    trainer = train(cfg, run_dir, max_minutes=args.max_minutes, threads=args.threads)
    if trainer.step >= cfg.steps:
        out = Path(args.out) if args.out else artifacts.writable_path(folder, METHOD)
        trainer.export(out)
        print(f"fine-tuned {cfg.steps} steps under schedule {trainer.schedule.text()}; wrote {out}")
    return 0
