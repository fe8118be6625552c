"""Train a default model for about a given number of minutes on a given device.

Measures the training speed of this device first, picks the number of steps that
fits (a finished run in the folder is extended by a learning-rate restart), then
runs the plain ``sdinfer train-default`` command, which it prints, so the model
can be trained again anywhere with that command.  Used on the lent GPU machine:

    python bench/timed_train.py --arch dit --minutes 8 --device cuda --data-workers 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdinfer.models.default.architectures import TRAIN_OVERRIDES
from sdinfer.models.default.train import TrainConfig, Trainer


def steps_per_second(cfg: TrainConfig, device: str, workers: int, timed: int = 100) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), device=device, data_workers=workers)
        try:
            for _ in range(20):
                trainer.train_step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(timed):
                trainer.train_step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return timed / (time.perf_counter() - start)
        finally:
            trainer.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["unet", "dit"], required=True)
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data-workers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: train-default's)")
    ap.add_argument("--init-from", default=None, help="start a new run from this pipeline's weights")
    args = ap.parse_args()
    run_dir = Path(args.run_dir or f"runs/default-{args.arch}")
    base = dict(TRAIN_OVERRIDES[args.arch])
    if args.batch_size:
        base["batch_size"] = args.batch_size
    if args.lr:
        base["lr"] = args.lr
    if args.init_from:
        base["init_from"] = args.init_from
    rate = steps_per_second(TrainConfig(arch=args.arch, **{**base, "steps": 10**6, "restarts": ()}),
                            args.device, args.data_workers)
    new_steps = max(100, int(rate * args.minutes * 60 * 0.9) // 100 * 100)
    meta_path = run_dir / "checkpoint.json"
    done = json.loads(meta_path.read_text()) if meta_path.exists() else None
    cmd = [sys.executable, "-m", "sdinfer", "train-default", "--arch", args.arch, "--run-dir", str(run_dir),
           "--batch-size", str(base["batch_size"]), "--device", args.device,
           "--data-workers", str(args.data_workers), "--max-minutes", str(args.minutes * 1.15)]
    cmd += ["--lr", str(base["lr"])] if "lr" in base else []
    cmd += ["--init-from", base["init_from"]] if "init_from" in base else []
    if done and done["step"] >= done["config"]["steps"]:
        start = done["step"]
        cmd += ["--steps", str(start + new_steps),
                "--restarts", *map(str, (*done["config"]["restarts"], start))]
    else:
        cmd += ["--steps", str(new_steps)]
    print(json.dumps({"steps_per_s": round(rate, 2), "command": " ".join(cmd[1:])}), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
