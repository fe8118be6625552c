"""The Pareto front of everything ``sdinfer tune`` evaluated: wall speed-up against quality.

Each evaluated candidate is one point, at its evaluation on the most validation prompts: its
speed-up over the reference (the interleaved wall timing where it was a finalist, else the
screening estimate: the reference's seconds per image over its own on the same prompts, and the
MAC ratio beside it) and its quality (the budget's first measure; adherence as the drop, so
that lower is better there).  ``eval.pareto.front`` keeps the undominated points.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..eval.pareto import Point, front


def points(result, evaluator, budget) -> list[dict]:
    measured = {c: m for c, m in result.measured}
    out = []
    for c, e in result.latest().items():
        m = measured.get(c)
        screening = evaluator.screening_speedup(c) if hasattr(evaluator, "screening_speedup") else None
        wall = m["speedup_wall"] if m else screening
        out.append({**c.as_dict(), **e.quality.as_dict(), "meets_budget": e.meets,
                    "speedup_wall": None if wall is None else round(wall, 4),
                    "wall_timing": "interleaved" if m else "screening",
                    "speedup_macs": round(evaluator.reference_cost / e.cost, 4) if e.cost else None,
                    "chosen": c == result.chosen})
    return out


def _quality(p: dict, measure: str) -> float | None:
    if measure == "adherence-drop":
        return None if p["adherence_drop"] is None else -p["adherence_drop"]
    return p[measure]


def pareto(rows: list[dict], measure: str) -> list[dict]:
    """The rows on the front of (speed-up, quality by ``measure``), by quality ascending."""
    usable = [(i, r) for i, r in enumerate(rows) if r["speedup_wall"] is not None and _quality(r, measure) is not None]
    pts = [Point(r["speedup_wall"], _quality(r, measure), str(i)) for i, r in usable]
    return [rows[int(p.label)] for p in front(pts)]


def write_front(rows: list[dict], measure: str, path: Path, meta: dict) -> list[dict]:
    kept = pareto(rows, measure)
    path.write_text(json.dumps({"meta": {**meta, "quality_axis": measure}, "front": kept, "points": rows},
                               indent=2, allow_nan=False) + "\n")
    return kept


def plot_front(rows: list[dict], measure: str, path: Path, title: str) -> bool:
    """The points and their front as a PNG; False when matplotlib is missing (the [plot] extra)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = pareto(rows, measure)
    sign = -1 if measure == "adherence-drop" else 1
    fig, ax = plt.subplots(figsize=(7, 5))
    for meets, colour, name in ((True, "tab:blue", "meets the budget"), (False, "tab:gray", "misses it")):
        xs = [r["speedup_wall"] for r in rows if r["meets_budget"] == meets and r["speedup_wall"] is not None
              and _quality(r, measure) is not None]
        ys = [sign * _quality(r, measure) for r in rows if r["meets_budget"] == meets and r["speedup_wall"] is not None
              and _quality(r, measure) is not None]
        ax.scatter(xs, ys, s=14, color=colour, label=name, alpha=0.7)
    ax.plot([r["speedup_wall"] for r in kept], [sign * _quality(r, measure) for r in kept], "-", color="tab:orange",
            label="Pareto front")
    for r in rows:
        if r["chosen"]:
            ax.scatter([r["speedup_wall"]], [sign * _quality(r, measure)], s=90, facecolors="none",
                       edgecolors="red", label=f"chosen: {r['label']}")
    ax.set_xlabel("wall speed-up over the reference (interleaved for the finalists, else screening)")
    ax.set_ylabel({"adherence-drop": "adherence drop vs reference (lower is better)", "psnr": "PSNR vs reference (dB)",
                   "ssim": "SSIM vs reference"}[measure])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
