"""A resumable training run's checkpoint: its tensors (weights, Adam's moments) in one safetensors
file and its step, settings and log in one JSON file beside it, each written atomically (a file
beside it, then renamed), so a run cut off at any moment resumes from its last whole checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TENSORS, META = "checkpoint.safetensors", "checkpoint.json"


def adam_tensors(opt: torch.optim.Optimizer, params) -> dict[str, torch.Tensor]:
    """Adam's state of each parameter (its index in ``params``) as tensors: ``opt.I.exp_avg``, ..."""
    tensors = {}
    for i, p in enumerate(params):
        st = opt.state.get(p)
        if st:
            tensors[f"opt.{i}.exp_avg"] = st["exp_avg"]
            tensors[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"]
            tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"]).reshape(1).float()
    return tensors


def load_adam(opt: torch.optim.Optimizer, params, tensors: dict[str, torch.Tensor], device="cpu") -> None:
    """Adam's state back from ``adam_tensors``' tensors (parameters without any keep a fresh state)."""
    for i, p in enumerate(params):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {"exp_avg": tensors[f"opt.{i}.exp_avg"].to(device).clone(),
                            "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].to(device).clone(),
                            "step": torch.tensor(float(tensors[f"opt.{i}.step"][0]))}


def write_checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (TENSORS + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(run_dir / TENSORS)
    tmp_meta = run_dir / (META + ".tmp")
    tmp_meta.write_text(json.dumps(meta))
    tmp_meta.replace(run_dir / META)


def read_meta(run_dir: Path) -> dict | None:
    """The checkpoint's JSON, or None where the run has none yet."""
    path = run_dir / META
    return json.loads(path.read_text()) if path.exists() else None


def read_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / TENSORS))


def run_steps(trainer, end: int, checkpoint_every: int, max_minutes: float | None = None,
              log_every: int = 50) -> bool:
    """Train ``trainer`` (its ``train_step()`` returning the loss, ``step``, ``log`` and ``save()``) up
    to step ``end``: the mean loss logged every ``log_every`` steps, a checkpoint every
    ``checkpoint_every`` and at the end; past ``max_minutes`` it saves and stops, to resume when
    the command is repeated.  True when it reached ``end``."""
    start, recent = time.time(), []
    while trainer.step < end:
        recent.append(trainer.train_step())
        if trainer.step % log_every == 0 or trainer.step == end:
            entry = {"step": trainer.step, "loss": round(float(np.mean(recent)), 6),
                     "elapsed_s": round(time.time() - start, 1)}
            trainer.log.append(entry)
            print(json.dumps(entry), flush=True)
            recent = []
        if trainer.step % checkpoint_every == 0 or trainer.step == end:
            trainer.save()
        if max_minutes is not None and time.time() - start > max_minutes * 60 and trainer.step < end:
            trainer.save()
            print(f"stopped after {max_minutes} minutes at step {trainer.step}; run the same command again to "
                  "resume", flush=True)
            return False
    return True
