"""Summarise a default-model training run from its checkpoint: steps, wall time, final loss.

    python bench/training_summary.py runs/default-unet runs/default-dit
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summarise(run_dir: Path) -> dict:
    meta = json.loads((run_dir / "checkpoint.json").read_text())
    log = meta["log"]
    wall, last = 0.0, 0.0
    for entry in log:  # elapsed_s restarts at 0 when a run is resumed
        if entry["elapsed_s"] < last:
            wall += last
        last = entry["elapsed_s"]
    wall += last
    tail = [e["loss"] for e in log[-4:]]
    return {"run": str(run_dir), "arch": meta["config"]["arch"], "steps": meta["step"],
            "planned_steps": meta["config"]["steps"], "wall_min": round(wall / 60, 1),
            "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
            "config": meta["config"]}


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(json.dumps(summarise(Path(arg))))
