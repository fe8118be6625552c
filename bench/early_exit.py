"""Early exit (ASE, ``sdinfer.distill.early_exit``) on a default model: quality and speed.

Quality run (deterministic, needs no idle machine): the held-out prompts (one seed per prompt, the
seeds every bench uses) at DDIM ``--steps`` with guidance ``--cfg``, for the unmodified model, the
fine-tuned early-exit model under its trained schedule, and the same schedule on the original
weights (what the fine-tuning buys): PSNR / SSIM against the unmodified model's images, adherence,
and the MACs of one generation (``sdinfer.eval.cost``) with the fraction saved.

Timing run (``--timing``): the unmodified model and the early-exit one, interleaved
(``eval.bench.measure_all``) on the first ``--timing-prompts`` prompts, the median of ``--repeats``;
it holds /tmp/bench.lock while it times (waiting while another process holds it).

    PYTHONPATH=src python bench/early_exit.py --model dit --json bench/results/early-exit-dit.json
    PYTHONPATH=src python bench/early_exit.py --model dit --timing --json bench/results/early-exit-timing-dit.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from sdinfer.cli import _quiet_libraries
from sdinfer.distill import early_exit
from sdinfer.eval.adherence import adherence_rate
from sdinfer.eval.bench import RunSpec, generate_images, machine_description, measure_all
from sdinfer.eval.cost import count_macs
from sdinfer.eval.metrics import psnr, ssim
from sdinfer.eval.prompts import load_prompts
from sdinfer.pipeline import Pipeline

SEED = 0
LOCK = Path("/tmp/bench.lock")


def generate(pipe: Pipeline, prompts: list[str], steps: int, cfg: float, batch: int, spec: str = ""):
    return generate_images(pipe, prompts, steps, cfg, batch, SEED, accelerate=spec)


def trained(pipe: Pipeline, weights: str = "") -> dict:
    """The weights' schedule and training record (default: the shipped weights)."""
    model = pipe.model.denoiser
    file = early_exit.weights_file(model, weights)
    _, meta = early_exit.read_weights(model, file)
    return {"weights": str(file), "schedule": meta["schedule"], "steps_trained": int(meta["steps"]), "units": meta["units"],
            "train": {k: v for k, v in meta["train"].items() if k != "errors"},
            "skip_errors_before_finetuning": meta["train"].get("errors")}


def configs(schedule: str, weights: str = "") -> list[tuple[str, str]]:
    spec = f"early-exit:weights={weights}" if weights else "early-exit"
    return [("unmodified", ""), ("early-exit (fine-tuned)", spec),
            ("early-exit schedule, original weights", f"early-exit:weights=original,schedule={schedule}")]


def quality(args, prompts: list[str]) -> dict:
    pipe = Pipeline.from_pretrained(args.model)
    info = trained(pipe, args.weights)
    reference = generate(pipe, prompts, args.steps, args.cfg, args.batch)
    rows = []
    base_macs = None
    for label, spec in configs(info["schedule"], args.weights):
        pixels = reference if not spec else generate(pipe, prompts, args.steps, args.cfg, args.batch, spec)
        macs = count_macs(lambda: generate(pipe, prompts[:1], args.steps, args.cfg, 1, spec))
        base_macs = base_macs or macs
        images = [(p.permute(1, 2, 0).numpy() * 255).round() for p in pixels]
        adherence = adherence_rate(images, prompts)
        row = {"config": label, "spec": spec, "psnr": round(psnr(pixels, reference), 2),
               "ssim": round(ssim(pixels, reference), 4),
               "adherence": None if adherence is None else round(adherence, 4),
               "gmacs_per_image": round(macs / 1e9, 4), "macs_saved": round(1 - macs / base_macs, 4)}
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return {"rows": rows, **info}


@contextlib.contextmanager
def bench_lock():
    """Hold /tmp/bench.lock (created exclusively), waiting while another process holds it."""
    while True:
        try:
            fd = os.open(LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            time.sleep(5)
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        LOCK.unlink(missing_ok=True)


def timing(args, prompts: list[str]) -> dict:
    pipe = Pipeline.from_pretrained(args.model)
    info = trained(pipe, args.weights)
    spec = f"early-exit:weights={args.weights}" if args.weights else "early-exit"
    original = f"early-exit:weights=original,schedule={info['schedule']}"   # the same blocks skipped
    specs = [RunSpec(steps=args.steps, cfg=args.cfg), RunSpec(steps=args.steps, cfg=args.cfg, accelerate=spec),
             RunSpec(steps=args.steps, cfg=args.cfg, accelerate=original)]
    prompts = prompts[:args.timing_prompts]
    with bench_lock():
        found = measure_all(pipe, specs, prompts, args.batch, SEED, args.repeats)
    base = found[0]
    rows = [{"config": s.accelerate or "unmodified", "wall_s": round(m.wall_s, 3),
             "wall_runs": [round(w, 3) for w in m.wall_runs], "speedup": round(base.wall_s / m.wall_s, 3),
             "gmacs_per_image": round(m.macs / 1e9, 4), "psnr": round(psnr(m.pixels, base.pixels), 2)}
            for s, m in zip(specs, found)]
    return {"rows": rows, "schedule": info["schedule"], "timing_prompts": len(prompts), "repeats": args.repeats,
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dit")
    p.add_argument("--prompts", default="heldout")
    p.add_argument("--limit", type=int, default=0, help="the first N prompts only")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--timing", action="store_true", help="time the unmodified and early-exit models instead")
    p.add_argument("--timing-prompts", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--weights", default="", help="an early-exit weights file (default: the one beside the model)")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet_libraries()
    torch.manual_seed(0)
    prompts = load_prompts(args.prompts)
    prompts = prompts[:args.limit] if args.limit else prompts
    start = time.time()
    result = timing(args, prompts) if args.timing else quality(args, prompts)
    result.update({"model": args.model, "steps": args.steps, "cfg": args.cfg, "prompts": args.prompts,
                   "n_prompts": len(prompts), "machine": machine_description(),
                   "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - start, 1),
                   "command": "PYTHONPATH=src python bench/early_exit.py " + " ".join(argv or sys.argv[1:])})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["rows"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
