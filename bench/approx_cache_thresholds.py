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
that on the pairs at or above every similarity from s up, the resumed images' adherence to B
(``sdinfer.eval.adherence``) is within 2 points of the full generations' on the same pairs;
where no similarity qualifies, only the same prompt (0.9999) does.  The thresholds are then
made non-decreasing in K.  Writes a JSON (thresholds, per-K adherence and PSNR against the full
generation by similarity band, per-attribute similarities, the command).
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


def threshold_for(sims: np.ndarray, resumed_ok: np.ndarray, full_ok: np.ndarray, tolerance: float,
                  min_pairs: int) -> float:
    """The lowest similarity s such that for every pair similarity s' >= s the pairs at or above
    s' keep the resumed adherence within ``tolerance`` of the full one (sets of fewer than
    ``min_pairs`` pairs are not judged); SAME_PROMPT where none does."""
    order = np.argsort(-sims)
    best = SAME_PROMPT
    for n in range(1, len(order) + 1):
        top = order[:n]
        if n >= min_pairs and resumed_ok[top].mean() < full_ok[top].mean() - tolerance:
            break
        if n >= min_pairs:
            best = float(sims[order[n - 1]])
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="unet")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--near", type=int, default=30, help="near-duplicate pairs (default: 30)")
    ap.add_argument("--unrelated", type=int, default=10, help="unrelated pairs (default: 10)")
    ap.add_argument("--tolerance", type=float, default=0.02, help="adherence points allowed (default: 0.02)")
    ap.add_argument("--min-pairs", type=int, default=4, help="smallest set of pairs judged (default: 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/approx_cache_thresholds.json")
    args = ap.parse_args(argv)
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
    per_k, thresholds = {}, []
    for k in ks:
        resumed = run(pipe, list(b_prompts), seeds, args, start=(k, kept[k]))
        ok = np.array([bool(adheres(im, b)) for im, b in zip(resumed.images, b_prompts)])
        dbs = [psnr(r[None], f[None]) for r, f in zip(resumed.pixels, full.pixels)]
        tau = threshold_for(sims, ok, full_ok, args.tolerance, args.min_pairs)
        thresholds.append(tau)
        per_k[k] = {"threshold": tau,
                    "by_kind": {kind: {"adherence_resumed": float(ok[np.array(kinds) == kind].mean()),
                                       "adherence_full": float(full_ok[np.array(kinds) == kind].mean()),
                                       "psnr_db": float(np.mean([d for d, kk in zip(dbs, kinds) if kk == kind]))}
                                for kind in sorted(set(kinds))},
                    "above_threshold": {"pairs": int((sims >= tau).sum()),
                                        "adherence_resumed": float(ok[sims >= tau].mean()) if (sims >= tau).any() else None,
                                        "adherence_full": float(full_ok[sims >= tau].mean()) if (sims >= tau).any() else None,
                                        "psnr_db": float(np.mean([d for d, s in zip(dbs, sims) if s >= tau]))
                                        if (sims >= tau).any() else None}}
        print(f"K={k:3d}: threshold {tau:.4f}  " + "  ".join(
            f"{kind} {v['adherence_resumed']:.2f}/{v['adherence_full']:.2f} {v['psnr_db']:.1f}dB"
            for kind, v in per_k[k]["by_kind"].items()), flush=True)
    monotone = list(np.maximum.accumulate(thresholds))
    out = {"command": "OMP_NUM_THREADS=1 PYTHONPATH=src python bench/approx_cache_thresholds.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "model": args.model, "steps": args.steps, "sampler": args.sampler, "cfg": args.cfg,
           "fractions": list(CANDIDATE_FRACTIONS), "candidate_steps": ks,
           "thresholds": [round(float(t), 4) for t in monotone], "raw_thresholds": thresholds,
           "similarity_by_kind": {kind: {"mean": float(sims[np.array(kinds) == kind].mean()),
                                         "min": float(sims[np.array(kinds) == kind].min()),
                                         "max": float(sims[np.array(kinds) == kind].max())}
                                  for kind in sorted(set(kinds))},
           "full_adherence": float(full_ok.mean()), "per_k": per_k,
           "pairs": [{"a": a, "b": b, "kind": kind, "similarity": float(s)} for (a, b, kind), s in zip(pairs, sims)],
           "seconds": round(time.perf_counter() - started, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"thresholds per fraction {list(CANDIDATE_FRACTIONS)}: {out['thresholds']}  ({out['seconds']} s; {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
