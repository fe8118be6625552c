"""Adherence of few-step configurations on the tune's validation prompts, against 50-step DDIM.

What ``sdinfer tune`` measures of a candidate (``tune.evaluate.ModelEvaluator``: the validation
prompts, their noise seeds 500000+, the shapes checker), for configurations named on the command
line, on as many validation prompts as asked: how far a model is from a budget at a step count,
without a search.

    python bench/few_step_adherence.py --model dit --validation 200 --cfg 4 \\
        --config "ddim:8 afs" --config "ddim:8 grid=gits afs" --json bench/results/few-step-adherence-dit.json

A configuration is ``SAMPLER:STEPS`` followed by ``grid=NAME``, ``afs`` (the analytic first step)
and ``+ CACHE`` words, as the tune's labels write them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def parse_config(text: str):
    from sdinfer.errors import UserError
    from sdinfer.tune.space import Candidate, Setting

    head, _, rest = text.strip().partition(" ")
    sampler, _, steps = head.partition(":")
    if not steps.isdigit():
        raise UserError(f"configuration {text!r}: write SAMPLER:STEPS [grid=NAME] [afs] [+ CACHE]")
    spacing, afs, cache = None, False, ""
    words = rest.split()
    while words:
        word = words.pop(0)
        if word == "afs":
            afs = True
        elif word.startswith("grid="):
            spacing = word[5:]
        elif word == "+" and words:
            cache = words.pop(0)
        else:
            raise UserError(f"configuration {text!r}: unknown word {word!r}")
    setting = Setting((("sampler", sampler), ("spacing", spacing), ("analytic_first_step", afs), ("accelerate", cache)))
    return Candidate(setting, int(steps))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dit")
    ap.add_argument("--validation", type=int, default=200)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    import torch

    from sdinfer.eval.prompts import validation_prompts
    from sdinfer.pipeline import Pipeline
    from sdinfer.tune.evaluate import ModelEvaluator

    if args.threads:
        torch.set_num_threads(args.threads)
    candidates = [parse_config(c) for c in args.config]
    pipe = Pipeline.from_pretrained(args.model)
    evaluator = ModelEvaluator(pipe, validation_prompts(args.validation), args.cfg)
    start = time.perf_counter()
    rows = []
    for c in candidates:
        q = evaluator.quality(c, args.validation)
        rows.append({"config": c.label, **q.as_dict(), "macs_speedup": round(evaluator.reference_cost / evaluator.cost(c), 3)})
        print(f"{c.label}: adherence {q.adherence:.1%} against {q.reference_adherence:.1%} (DDIM 50), "
              f"PSNR {q.psnr:.1f} dB, {rows[-1]['macs_speedup']}x MACs", flush=True)
    meta = {"model": args.model, "validation_prompts": args.validation, "cfg": args.cfg,
            "date": datetime.date.today().isoformat(), "seconds": round(time.perf_counter() - start, 1),
            "command": "python bench/few_step_adherence.py " + " ".join(
                a if " " not in a else repr(a) for a in sys.argv[1:])}
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
