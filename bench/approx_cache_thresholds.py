"""Calibrate the similarity thresholds of NIRVANA's approximate cache (Agarwal et al., NSDI 2024;
``sdinfer.serve.approx_cache``) on one of our models.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/approx_cache_thresholds.py --model unet

Pairs (cached prompt A, new prompt B), none of them held out: A from the validation set
(``sdinfer.eval.prompts.validation_prompts``, the training grammar), B a near-duplicate of A
with one attribute changed (colour, position, kind, size or background word, in turn) or an
unrelated validation prompt (kind, colour and position all different).  Per pair: A's full
generation keeps its latents at each candidate K (the fractions 0.1 .. 0.5 of the steps); B
runs in full from the same seed (the reference) and resumed from A's latent at each K under
B's prompt (what a cache hit serves).  Per K, the threshold is the lowest similarity s such
that on the pairs at or above every similarity from s up (sets of at least --min-pairs), at
most 2% of the pairs lose adherence to B (``sdinfer.eval.adherence``): the full generation
adheres, the resumed image does not (a loss where the resumed image is within 40 dB of the full
one, the same image to the eye, is the checker's borderline and not counted; gains do not offset
losses); so adherence stays within 2 points of full generation's.  Where no similarity
qualifies, only the same prompt (0.9999) does.  The thresholds are
then made non-decreasing in K.  Writes a JSON (thresholds, per-K adherence and PSNR against the
full generation by attribute and at or above the threshold, every pair's outcome, the command);
``--from-json FILE`` recomputes the thresholds from a saved run's pairs without generating.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sdinfer.cli import _quiet_libraries
from sdinfer.eval.adherence import adheres, parse_caption
from sdinfer.eval.metrics import psnr
from sdinfer.eval.prompts import validation_prompts
from sdinfer.models.default import shapes
from sdinfer.pipeline import Pipeline
from sdinfer.serve.approx_cache import CANDIDATE_FRACTIONS, candidate_steps, prompt_embedding

SAME_PROMPT = 0.9999
ATTRIBUTES = ("colour", "position", "kind", "size", "background")


def parts(caption: str) -> dict:
    facts = parse_caption(caption)
    size = next((s for s in shapes.SIZES if re.search(rf"\b{s}\b", caption)), None)
    bg = re.search(r"on an? (\w+) background", caption)
    return {"kind": facts.kind, "colour": facts.colour, "position": facts.position, "size": size,
            "background": bg.group(1) if bg else None}


def caption(p: dict) -> str:
    return shapes.make_caption(p["kind"], p["colour"], p["position"], p["size"], p["background"])


def near_duplicate(prompt: str, attribute: str, rng, forbidden: set) -> str | None:
    """``prompt`` with one attribute changed (to another value of the grammar)."""
    p = parts(prompt)
    values = {"colour": list(shapes.COLOURS), "position": list(shapes.POSITIONS), "kind": list(shapes.KINDS),
              "size": [None, *shapes.SIZES], "background": [None, *shapes.BACKGROUNDS]}[attribute]
    for v in rng.permutation(len(values)):
        if values[v] != p[attribute]:
            out = caption({**p, attribute: values[v]})
            if out not in forbidden:
                return out
    return None


def make_pairs(near: int, unrelated: int, seed: int) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(seed)
    pool = validation_prompts(200)
    forbidden = set(shapes.heldout_prompts())
    pairs = []
    for i, a in enumerate(pool[:near]):
        b = near_duplicate(a, ATTRIBUTES[i % len(ATTRIBUTES)], rng, forbidden)
        if b is not None:
            pairs.append((a, b, ATTRIBUTES[i % len(ATTRIBUTES)]))
    rest = pool[near:]
    for a in pool[:unrelated]:
        pa = parts(a)
        b = next(c for c in rest if all(parts(c)[k] != pa[k] for k in ("kind", "colour", "position")))
        rest.remove(b)
        pairs.append((a, b, "unrelated"))
    return pairs


def run(pipe, prompts, seeds, args, **kw):
    return pipe(prompts, seeds=seeds, steps=args.steps, sampler=args.sampler, guidance_scale=args.cfg, **kw)


def threshold_for(sims: np.ndarray, resumed_ok: np.ndarray, full_ok: np.ndarray, dbs: np.ndarray,
                  tolerance: float, min_pairs: int, same_image_db: float) -> float:
    """The lowest similarity s such that every set of the most similar pairs down to s (from
    ``min_pairs`` pairs on) loses at most ``tolerance`` of its pairs' adherence: pairs whose full
    generation adheres and whose resumed image does not.  A loss where the resumed image is within
    ``same_image_db`` of the full one is the checker's borderline, not the cache's (the two are
    the same image to the eye) and is not counted.  SAME_PROMPT where even the ``min_pairs`` most
    similar pairs lose more."""
    order = np.argsort(-sims, kind="stable")
    lost = full_ok & ~resumed_ok & (dbs < same_image_db)
    best = SAME_PROMPT
    for n in range(min_pairs, len(order) + 1):
        if lost[order[:n]].sum() > tolerance * n:
            break
        best = float(sims[order[n - 1]])
    return best


def summarise(pairs: list[dict], ks: list[int], tolerance: float, min_pairs: int,
              same_image_db: float) -> tuple[list, dict]:
    """Thresholds (made non-decreasing in K) and per-K figures from the per-pair records."""
    sims = np.array([p["similarity"] for p in pairs])
    kinds = np.array([p["kind"] for p in pairs])
    full_ok = np.array([p["full_adheres"] for p in pairs])
    per_k, raw = {}, []
    for k in ks:
        ok = np.array([p[f"k{k}"]["adheres"] for p in pairs])
        dbs = np.array([p[f"k{k}"]["psnr_db"] for p in pairs])
        tau = threshold_for(sims, ok, full_ok, dbs, tolerance, min_pairs, same_image_db)
        raw.append(tau)
        top = sims >= tau
        per_k[k] = {"threshold": tau,
                    "by_kind": {kind: {"adherence_resumed": float(ok[kinds == kind].mean()),
                                       "adherence_full": float(full_ok[kinds == kind].mean()),
                                       "psnr_db": float(dbs[kinds == kind].mean())}
                                for kind in sorted(set(kinds))},
                    "at_or_above_threshold": {"pairs": int(top.sum()),
                                              "adherence_resumed": float(ok[top].mean()) if top.any() else None,
                                              "adherence_full": float(full_ok[top].mean()) if top.any() else None,
                                              "psnr_db": float(dbs[top].mean()) if top.any() else None}}
    return [round(float(t), 4) for t in np.maximum.accumulate(raw)], per_k


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="unet")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--near", type=int, default=50, help="near-duplicate pairs (default: 50)")
    ap.add_argument("--unrelated", type=int, default=14, help="unrelated pairs (default: 14)")
    ap.add_argument("--tolerance", type=float, default=0.02, help="adherence points allowed (default: 0.02)")
    ap.add_argument("--min-pairs", type=int, default=8, help="smallest set of pairs judged (default: 8)")
    ap.add_argument("--same-image-db", type=float, default=40.0,
                    help="PSNR to the full image above which a lost detection is not counted (default: 40)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/approx_cache_thresholds.json")
    ap.add_argument("--from-json", default=None, help="recompute the thresholds of a saved run (no generation)")
    args = ap.parse_args(argv)
    if args.from_json:
        out = json.loads(Path(args.from_json).read_text())
        out["per_k"] = {}
        finish(out, args)
        return 0
    _quiet_libraries()
    torch.set_num_threads(1)
    started = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.model)
    pairs = make_pairs(args.near, args.unrelated, args.seed)
    a_prompts, b_prompts, kinds = zip(*pairs)
    seeds = [args.seed + 7919 * i for i in range(len(pairs))]
    sims = np.array([float(np.dot(prompt_embedding(pipe, a), prompt_embedding(pipe, b))) for a, b, _ in pairs])
    ks = [k for k in candidate_steps(args.steps, CANDIDATE_FRACTIONS) if k is not None]
    kept = {}
    run(pipe, list(a_prompts), seeds, args,
        callback=lambda i, x: kept.__setitem__(i + 1, x.clone()) if i + 1 in ks else None)
    full = run(pipe, list(b_prompts), seeds, args)
    full_ok = np.array([bool(adheres(im, b)) for im, b in zip(full.images, b_prompts)])
    per_pair = [dict(full_adheres=bool(f)) for f in full_ok]
    for k in ks:
        resumed = run(pipe, list(b_prompts), seeds, args, start=(k, kept[k]))
        ok = [bool(adheres(im, b)) for im, b in zip(resumed.images, b_prompts)]
        dbs = [psnr(r[None], f[None]) for r, f in zip(resumed.pixels, full.pixels)]
        for rec, o, d in zip(per_pair, ok, dbs):
            rec[f"k{k}"] = {"adheres": o, "psnr_db": round(float(d), 2)}
        print(f"K={k}: resumed adherence {np.mean(ok):.3f} (full {full_ok.mean():.3f}), "
              f"PSNR {np.mean(dbs):.1f} dB", flush=True)
    records = [{"a": a, "b": b, "kind": kind, "similarity": float(s), **rec}
               for (a, b, kind), s, rec in zip(pairs, sims, per_pair)]
    out = {"command": "OMP_NUM_THREADS=1 PYTHONPATH=src python bench/approx_cache_thresholds.py " +
                      " ".join(sys.argv[1:] if argv is None else argv),
           "model": args.model, "steps": args.steps, "sampler": args.sampler, "cfg": args.cfg,
           "fractions": list(CANDIDATE_FRACTIONS), "candidate_steps": ks,
           "seconds": round(time.perf_counter() - started, 1), "pairs": records}
    finish(out, args)
    return 0


def finish(out: dict, args) -> None:
    """Thresholds and summaries from the pairs' records; written to --out and printed."""
    pairs, ks = out["pairs"], out["candidate_steps"]
    out["thresholds"], out["per_k"] = summarise(pairs, ks, args.tolerance, args.min_pairs, args.same_image_db)
    out["tolerance"], out["min_pairs"], out["same_image_db"] = args.tolerance, args.min_pairs, args.same_image_db
    sims = np.array([p["similarity"] for p in pairs])
    kinds = np.array([p["kind"] for p in pairs])
    out["similarity_by_kind"] = {kind: {"mean": float(sims[kinds == kind].mean()),
                                        "min": float(sims[kinds == kind].min()),
                                        "max": float(sims[kinds == kind].max())} for kind in sorted(set(kinds))}
    out["full_adherence"] = float(np.mean([p["full_adheres"] for p in pairs]))
    for k, v in out["per_k"].items():
        print(f"K={k:3d}: threshold {v['threshold']:.4f}  " + "  ".join(
            f"{kind} {b['adherence_resumed']:.2f}/{b['adherence_full']:.2f} {b['psnr_db']:.1f}dB"
            for kind, b in v["by_kind"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"thresholds per fraction {out['fractions']}: {out['thresholds']}  ({out['seconds']} s; {args.out})")


if __name__ == "__main__":
    sys.exit(main())
