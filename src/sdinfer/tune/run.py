"""``tune(pipe, budget, ...)``: the whole of ``sdinfer tune`` on a loaded pipeline: the space the
model supports, the search on validation prompts, the preset, the front, and the message when no
configuration meets the budget."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .budget import Budget
from .evaluate import ModelEvaluator
from .front import plot_front, points, write_front
from .preset import Preset, save_preset
from .search import TuneResult, search
from .space import Space, model_space

REFERENCE = "ddim:50"


@dataclass
class Tuned:
    preset: Preset
    result: TuneResult
    front: list[dict]
    points: list[dict]
    plotted: bool
    seconds: float


def tune(pipe, budget: Budget, prompts: list[str], cfg: float = 4.0, out: Path | None = None,
         space: Space | None = None, time_limit_s: float | None = None, first_rung: int = 8, eta: int = 4,
         finalists: int = 3, batch: int = 32, repeats: int = 1, log=print) -> Tuned:
    """Search ``space`` (default: what the model supports) for the fastest configuration meeting
    ``budget`` on ``prompts``; writes ``out/preset.json``, ``out/front.json`` and ``out/front.png``
    where ``out`` is given.  Nothing meeting the budget is a ``UserError`` naming the best reached."""
    start = time.monotonic()
    if budget.needs_adherence and any(_not_checkable(p) for p in prompts):
        raise UserError("an adherence-drop budget needs prompts the shapes checker reads (the validation set of "
                        "the default models); use a psnr= or ssim= budget for other prompts")
    space = space or model_space(pipe, cfg)
    log(f"tuning {pipe.model.name}: {len(space.settings())} settings x up to {len(space.steps)} step counts "
        f"({len(space.candidates())} candidates in the full grid), {len(prompts)} validation prompts, budget {budget}")
    evaluator = ModelEvaluator(pipe, prompts, cfg, REFERENCE, batch=batch, repeats=repeats, log=log)
    remaining = None if time_limit_s is None else time_limit_s - (time.monotonic() - start)
    result = search(space, budget, evaluator, first_rung=first_rung, eta=eta, finalists=finalists,
                    time_limit_s=remaining, log=log)
    rows = points(result, evaluator, budget)
    meta = {"model": pipe.model.name, "budget": str(budget), "reference": REFERENCE, "cfg": cfg,
            "validation_prompts": len(prompts), "evaluations": len(result.evaluations), "images": result.images,
            "grid_candidates": len(space.candidates()), "rungs": result.rungs, "stopped_early": result.stopped_early,
            "space": space.describe(), "seconds": round(time.monotonic() - start, 1)}
    front, plotted = [], False
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        front = write_front(rows, budget.primary, out / "front.json", meta)
        plotted = plot_front(rows, budget.primary, out / "front.png",
                             f"{pipe.model.name}: budget {budget}, {len(prompts)} validation prompts")
    if result.chosen is None:
        raise UserError(_not_met(budget, result, len(space.candidates())))
    c = result.chosen
    validation = {"prompts": len(prompts), "reference": REFERENCE, **result.chosen_quality.as_dict(),
                  **result.chosen_measurement, "evaluations": len(result.evaluations), "images": result.images,
                  "grid_candidates": len(space.candidates()), "stopped_early": result.stopped_early}
    preset = Preset(model=pipe.model.name, sampler=c.setting.get("sampler"), steps=c.steps, guidance_scale=cfg,
                    spacing=c.setting.get("spacing"), analytic_first_step=bool(c.setting.get("analytic_first_step")),
                    accelerate=c.setting.get("accelerate") or "", budget=str(budget), reference=REFERENCE,
                    validation=validation)
    if out is not None:
        save_preset(preset, out / "preset.json")
    return Tuned(preset, result, front, rows, plotted, time.monotonic() - start)


def _not_checkable(prompt: str) -> bool:
    from ..eval.adherence import parse_caption

    return parse_caption(prompt) is None


def _not_met(budget: Budget, result: TuneResult, grid: int) -> str:
    best = result.best_missing
    where = " (the time limit stopped the search early)" if result.stopped_early else ""
    if best is None:
        return f"no configuration was evaluated{where}; give a longer --time-limit"
    return (f"no configuration meets the budget {budget}{where}: the best reached is {best.candidate.label} with "
            f"{budget.describe(best.quality)}; loosen the budget (e.g. a larger adherence-drop or a lower psnr) "
            f"or tune at another --cfg ({len(result.evaluations)} evaluations of {grid} candidates)")


def summary(t: Tuned) -> str:
    v = t.preset.validation
    return json.dumps({k: v[k] for k in ("speedup_wall", "speedup_macs", "psnr", "ssim", "adherence",
                                         "reference_adherence") if k in v})
