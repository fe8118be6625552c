"""``sdinfer distill linfusion``: train LinFusion's linear attention for a UNet (resumable)."""

from __future__ import annotations

from pathlib import Path

from .options import quiet_libraries


def add_parser(procedures) -> None:
    p = procedures.add_parser(
        "linfusion", help="LinFusion: linear stand-ins of a UNet's self-attention, distilled from it",
        description="Train the linear attention that replaces each self-attention of a UNet (LinFusion, "
                    "Liu et al. 2024) by distillation from the model: first layer by layer on captured "
                    "inputs, then end to end; seeded, and resumed when the command is repeated.  The "
                    "result goes to MODEL/sdinfer_calibration/linfusion.safetensors, mounted by "
                    "--accelerate linfusion.")
    p.add_argument("--model", required=True, help="a shipped model name (unet, unet-64) or a pipeline folder")
    p.add_argument("--steps", type=int, default=None, help="training steps in all (default: 1000)")
    p.add_argument("--layerwise-steps", type=int, default=None,
                   help="of them, the first ones on the per-layer feature loss alone (default: 300)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: 16)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3)")
    p.add_argument("--mid-dim", type=int, default=None,
                   help="width of the refiner MLPs f_q, f_k (default: each layer's width)")
    p.add_argument("--seed", type=int, default=None, help="seed of data, noise and the new modules (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this long")
    p.add_argument("--run-dir", default=None, help="checkpoint folder (default: runs/linfusion-MODEL)")
    p.add_argument("--out", default=None,
                   help="where to write the weights (default: MODEL/sdinfer_calibration/linfusion.safetensors)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..distill.linfusion_train import LinFusionTrainConfig, train

    given = {"model": args.model, "steps": args.steps, "layerwise_steps": args.layerwise_steps,
             "batch_size": args.batch_size, "lr": args.lr, "mid_dim": args.mid_dim, "seed": args.seed}
    cfg = LinFusionTrainConfig(**{k: v for k, v in given.items() if v is not None})
    run_dir = Path(args.run_dir or f"runs/linfusion-{Path(args.model).name}")
    quiet_libraries()
    trainer = train(cfg, run_dir, max_minutes=args.max_minutes, threads=args.threads)
    if trainer.step >= cfg.steps:
        out = trainer.export(args.out)
        print(f"trained {cfg.steps} steps; wrote the linfusion weights to {out}")
    return 0
