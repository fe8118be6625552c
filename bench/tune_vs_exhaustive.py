"""How close ``sdinfer tune``'s search gets to the exhaustive grid on a small space, on a model.

The space: ddim, dpm-solver++ and unipc, each on its own grid and the model's GITS grid, with and
without the analytic first step, at 3-20 steps (no cache: the grid stays small enough to run
whole).  The exhaustive side evaluates every candidate on every validation prompt; within a
setting the wall time grows with the steps, so its optimum is the fastest of each setting's
fewest steps that meet the budget.  Those, and the search's choice, are then timed together,
interleaved with the reference (``eval.bench.measure_all``), and the search's choice is compared
with the fastest of them.  Writes one JSON: both choices, their measured speed-ups, the ratio, and
each side's evaluations and generated images.

    python bench/tune_vs_exhaustive.py --model unet --budget adherence-drop=0.02 --validation 32 \
        --json bench/results/tune-vs-exhaustive-unet.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="unet")
    ap.add_argument("--budget", default="adherence-drop=0.02")
    ap.add_argument("--validation", type=int, default=32)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    import torch

    from sdinfer.cli import _quiet_libraries
    from sdinfer.eval.prompts import validation_prompts
    from sdinfer.pipeline import Pipeline
    from sdinfer.tune.budget import parse_budget
    from sdinfer.tune.evaluate import ModelEvaluator
    from sdinfer.tune.search import Evaluation, search
    from sdinfer.tune.space import model_space

    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet_libraries()
    log = lambda m: print(m, file=sys.stderr, flush=True)   # noqa: E731
    pipe = Pipeline.from_pretrained(args.model)
    budget = parse_budget(args.budget)
    prompts = validation_prompts(args.validation)
    space = model_space(pipe, args.cfg, size="small", samplers=("ddim", "dpm-solver++", "unipc"), caches=("",),
                        steps=(3, 4, 5, 6, 7, 8, 10, 12, 15, 20))
    space.axes[1] = type(space.axes[1])("spacing", tuple(s for s in (None, "gits") if s is None or
                                                          _has(pipe, "gits", args.cfg)))
    space.axes[2] = type(space.axes[2])("analytic_first_step", (False, True))
    log(f"{args.model}: {len(space.settings())} settings, {len(space.candidates())} candidates, "
        f"{len(prompts)} validation prompts, budget {budget}")

    # the search, on its own evaluator (nothing shared with the exhaustive side)
    start = time.monotonic()
    tuned_ev = ModelEvaluator(pipe, prompts, args.cfg, repeats=args.repeats, log=log)
    result = search(space, budget, tuned_ev, log=log)
    search_s = time.monotonic() - start

    # the exhaustive grid: every candidate on every prompt
    start = time.monotonic()
    ev = ModelEvaluator(pipe, prompts, args.cfg, repeats=args.repeats, log=log)
    grid = []
    for c in space.candidates():
        q = ev.quality(c, len(prompts))
        grid.append(Evaluation(c, q, ev.cost(c), budget.meets(q)))
    fewest = {}
    for e in grid:
        if e.meets and (e.candidate.setting not in fewest or e.candidate.steps < fewest[e.candidate.setting].candidate.steps):
            fewest[e.candidate.setting] = e
    exhaustive_s = time.monotonic() - start
    if not fewest:
        log("no candidate of the grid meets the budget")
        return 1
    timed = list(fewest.values())
    chosen = result.chosen
    cands = list(dict.fromkeys([e.candidate for e in timed] + ([chosen] if chosen is not None else [])))
    measured = dict(zip(cands, ev.measure(cands)))
    optimum = max(timed, key=lambda e: measured[e.candidate]["speedup_wall"]).candidate
    report = {
        "meta": {"model": args.model, "budget": str(budget), "validation_prompts": len(prompts), "cfg": args.cfg,
                 "repeats": args.repeats, "space": space.describe(), "date": time.strftime("%Y-%m-%d"),
                 "command": "python bench/tune_vs_exhaustive.py " + " ".join(sys.argv[1:])},
        "search": {"chosen": None if chosen is None else chosen.label,
                   "speedup_wall": None if chosen is None else measured[chosen]["speedup_wall"],
                   "evaluations": len(result.evaluations), "images": result.images, "seconds": round(search_s, 1)},
        "exhaustive": {"chosen": optimum.label, "speedup_wall": measured[optimum]["speedup_wall"],
                       "evaluations": len(grid), "images": len(grid) * len(prompts),
                       "seconds": round(exhaustive_s, 1)},
        "timed": [{"config": c.label, **measured[c]} for c in cands],
    }
    if chosen is not None:
        report["ratio_to_optimum"] = round(measured[chosen]["speedup_wall"] / measured[optimum]["speedup_wall"], 4)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("search", "exhaustive")} | {"ratio": report.get("ratio_to_optimum")},
                     indent=2))
    return 0


def _has(pipe, kind: str, cfg: float) -> bool:
    from sdinfer.models import artifacts

    return artifacts.find(pipe.model.path, kind, cfg) is not None


if __name__ == "__main__":
    sys.exit(main())
