"""A served workload for NIRVANA's approximate cache (issue 21, "Measure"): a seeded stream of
requests built from the held-out prompts, sent to ``sdinfer serve`` with the approximate cache on
and off, and the batcher on and off.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/serve_workload.py --model unet --requests 200 \\
        --steps 50 --concurrency 1,4,16 --json bench/results/serve-workload.json

Estimated run time of that command on this machine (2 CPU cores shared with other jobs, unet,
one torch thread): about 45 minutes, possibly up to 1.5 hours on a busy machine.  An *estimate*,
not a measurement, derived from one tiny run (the slow test: 12 requests, 4 steps, concurrency
1,2, batching at 2; 52 s in all): there a request took about 0.10-0.13 s at concurrency 1
(throughput 7.6-10 req/s) and each of the 6 server starts, with its PNG fetches and the MAC
count, about 7 s.  Scaling the request time linearly with the steps (an upper bound: the text
encoder, decode, PNG and HTTP do not grow with them) gives about 1.6 s per 50-step request; the
command sends the 200-request stream 8 times (cache off / on at 3 concurrencies, batcher off / on
at 8): 1600 requests x 1.6 s = 43 min, less what the hits skip and what batching gains, plus 8
server starts (about 1 min).  Run a tiny one first (``--requests 12 --steps 4``) and scale its
``meta.wall_s`` by requests x steps to re-estimate on another machine.

The stream (``build_stream``): a Zipf-like popularity over the base prompts (the held-out prompts
in their own order; the base of rank r is drawn with probability proportional to r^-a,
``--zipf``), each draw either the base prompt repeated or, with probability ``--near``, a
near-duplicate: the same caption with its colour or its position (one of the two, at random)
changed to another of the shapes grammar's words (``sdinfer.models.default.shapes``), so it stays
a prompt of the grammar.  Request i has seed i.  The stream is saved in the JSON.

Each run starts its own server (``bench/serve_load.py``'s ``Server``, a fresh store, so a fresh
approximate cache folder) and sends the stream with serve_load's ``run`` at a concurrency.  Per
run: hit rate, mean steps skipped, compute saved (the steps skipped, from each response's
``steps_skipped``, x the model's MACs per denoiser step, counted by
``sdinfer.eval.cost.count_macs`` as the MACs of a 2-step generation less those of a 1-step one,
guidance's two evaluations included), p50 / p95 latency and throughput.  For the cache-on run's
hits: their adherence (``sdinfer.eval.adherence.adheres`` on the returned PNG, to their own
prompt) against the adherence of the same requests' images in the cache-off run at the same
concurrency, and each hit's PSNR against that cache-off image (same prompt, same seed).
Batching: the stream (cache off) at ``--batch-concurrency`` with the batcher off
(``--batch-window-ms 0 --max-batch 1``) and on (the server's defaults), throughput.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402
from report import serve_workload_table  # noqa: E402

ATTRIBUTES = ("colour", "position")
BATCH_OFF = ["--batch-window-ms", "0", "--max-batch", "1"]


# ---- the stream ----------------------------------------------------------------------------
def caption_parts() -> dict[str, dict]:
    """Every caption of the shapes grammar -> its words (kind, colour, position, size, background)."""
    import itertools

    from sdinfer.models.default.shapes import BACKGROUNDS, COLOURS, KINDS, POSITIONS, SIZES, make_caption

    out = {}
    for kind, colour, position, size, bg in itertools.product(KINDS, COLOURS, POSITIONS, (None, *SIZES),
                                                              (None, *BACKGROUNDS)):
        out[make_caption(kind, colour, position, size, bg)] = {
            "kind": kind, "colour": colour, "position": position, "size": size, "background": bg}
    return out


def near_duplicate(prompt: str, rng: np.random.Generator, parts: dict[str, dict] | None = None) -> tuple[str, str]:
    """``prompt`` with its colour or its position changed to another word of the grammar; (new, attribute)."""
    from sdinfer.errors import UserError
    from sdinfer.models.default.shapes import COLOURS, POSITIONS, make_caption

    parts = parts or caption_parts()
    words = parts.get(prompt)
    if words is None:
        raise UserError(f"{prompt!r} is not a caption of the shapes grammar; the workload's near-duplicates "
                        "change one of its words, so build the stream from held-out or validation prompts")
    attribute = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
    choices = [w for w in (COLOURS if attribute == "colour" else POSITIONS) if w != words[attribute]]
    changed = {**words, attribute: choices[rng.integers(len(choices))]}
    return make_caption(changed["kind"], changed["colour"], changed["position"], changed["size"],
                        changed["background"]), attribute


def build_stream(prompts: list[str], requests: int, zipf: float = 1.0, near: float = 0.3,
                 seed: int = 0) -> list[dict]:
    """``requests`` requests: base prompt of rank r (1-based, in ``prompts``' order) drawn with
    probability proportional to r^-zipf; with probability ``near`` a near-duplicate of it (one
    attribute changed) instead of the base itself.  Request i has seed i."""
    from sdinfer.errors import UserError

    if requests < 1 or not prompts:
        raise UserError(f"the stream needs at least 1 request and 1 prompt, not {requests} and {len(prompts)}")
    if zipf < 0 or not 0 <= near <= 1:
        raise UserError(f"--zipf must be >= 0 (got {zipf}) and --near between 0 and 1 (got {near})")
    rng = np.random.default_rng(seed)
    weights = np.arange(1, len(prompts) + 1, dtype=np.float64) ** -zipf
    ranks = rng.choice(len(prompts), size=requests, p=weights / weights.sum())
    parts = caption_parts() if near > 0 else None
    stream = []
    for i, r in enumerate(ranks):
        base = prompts[int(r)]
        row = {"i": i, "seed": i, "rank": int(r) + 1, "base": base, "prompt": base, "changed": None}
        if near > 0 and rng.random() < near:
            row["prompt"], row["changed"] = near_duplicate(base, rng, parts)
        stream.append(row)
    return stream


# ---- measures ------------------------------------------------------------------------------
def macs_per_step(model: str) -> int:
    """The MACs of one denoiser step (guidance's evaluations included): a 2-step generation's
    count less a 1-step one's (the text encoder and decoder cancel)."""
    from sdinfer.pipeline import Pipeline
    from sdinfer.eval.cost import count_macs

    pipe = Pipeline.from_pretrained(model)
    one = count_macs(lambda: pipe("a red circle in the top left", steps=1, sampler="ddim"))
    two = count_macs(lambda: pipe("a red circle in the top left", steps=2, sampler="ddim"))
    return two - one


def fetch_image(base: str, image_id: str, timeout: float):
    from PIL import Image

    status, png = serve_load.request(base, f"/v1/images/{image_id}", timeout=timeout)
    if status != 200:
        raise RuntimeError(f"GET /v1/images/{image_id} answered {status}: {png}")
    with Image.open(io.BytesIO(png)) as im:
        return im.convert("RGB")


def to_tensor(image):
    import torch

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def serve_run(stream: list[dict], model: str, steps: int, concurrency: int, approx: bool, flags: list[str],
              timeout: float, keep_images: bool) -> tuple[dict, dict, dict]:
    """The stream against a fresh server; the run's figures, and (``keep_images``) the images by request."""
    tmp = Path(tempfile.mkdtemp(prefix="sdinfer-workload-"))
    server = serve_load.Server(tmp / "store", ["--model", model, *flags])
    body = {"steps": steps, "sampler": "ddim", "response_format": "url", "approx_cache": approx}
    try:
        start = time.monotonic()
        records = serve_load.run(lambda: server.base, len(stream), concurrency, body,
                                 [r["prompt"] for r in stream], timeout)
        wall = time.monotonic() - start
        images = {}
        if keep_images:
            for rec in records:
                if rec["status"] == 200:
                    images[rec["i"]] = fetch_image(server.base, rec["ids"][0], timeout)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    ok = sorted((r for r in records if r["status"] == 200), key=lambda r: r["i"])
    reports = {r["i"]: r["reports"][0] for r in ok}
    latencies = [r["seconds"] for r in ok]
    hits = [i for i, rep in reports.items() if rep["cache_hit"]]
    skipped = [rep["steps_skipped"] for rep in reports.values()]
    out = {"concurrency": concurrency, "approx_cache": approx, "server_flags": flags,
           "requests": len(records), "answered": len(ok),
           "failed": len(records) - len(ok), "hits": len(hits), "hit_rate": len(hits) / len(ok) if ok else None,
           "mean_steps_skipped": sum(skipped) / len(skipped) if skipped else None,
           "steps_skipped": sum(skipped), "steps_run": sum(rep["steps"] for rep in reports.values()),
           "p50_s": serve_load.percentile(latencies, 0.5), "p95_s": serve_load.percentile(latencies, 0.95),
           "throughput_rps": len(ok) / wall if wall > 0 else None, "wall_s": wall,
           "mean_batch_size": sum(r["batch_size"] for r in ok) / len(ok) if ok else None,
           "hit_requests": hits,
           "errors": sorted({f"{r['status']}: {r.get('error')}" for r in records if r["status"] != 200})}
    return out, images, reports


def quality(stream: list[dict], hits: list[int], on_images: dict, off_images: dict) -> dict:
    """The cache-on run's hits against the cache-off run's images of the same requests."""
    from sdinfer.eval.adherence import adheres
    from sdinfer.eval.metrics import psnr

    both = [i for i in hits if i in on_images and i in off_images]
    if not both:
        return {"compared": 0, "adherence_cached": None, "adherence_full": None, "psnr_db": None,
                "psnr_min_db": None}
    cached = [adheres(on_images[i], stream[i]["prompt"]) for i in both]
    full = [adheres(off_images[i], stream[i]["prompt"]) for i in both]
    values = [psnr(to_tensor(on_images[i]), to_tensor(off_images[i])) for i in both]

    def rate(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None
    return {"compared": len(both), "adherence_cached": rate(cached), "adherence_full": rate(full),
            "psnr_db": sum(values) / len(values), "psnr_min_db": min(values)}


def parse_levels(text: str) -> list[int]:
    from sdinfer.errors import UserError

    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or any(not 1 <= c <= serve_load.MAX_CONCURRENCY for c in levels):
        raise UserError(f"--concurrency {text!r}: give comma-separated levels between 1 and "
                        f"{serve_load.MAX_CONCURRENCY}, e.g. 1,4,16")
    return levels


def main(argv: list[str] | None = None) -> dict:
    from sdinfer.eval.prompts import load_prompts

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="unet", help="the served model (the thresholds are calibrated on unet)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default: 1,4,16)")
    p.add_argument("--batch-concurrency", type=int, default=8,
                   help="the batching comparison's concurrency (default: 8; 0 skips it)")
    p.add_argument("--prompts", default="heldout", help="base prompts: heldout, validation or a file of "
                   "shapes captions")
    p.add_argument("--zipf", type=float, default=1.0, help="popularity exponent a: rank r drawn ~ r^-a")
    p.add_argument("--near", type=float, default=0.3, help="share of near-duplicates (one attribute changed)")
    p.add_argument("--seed", type=int, default=0, help="the stream's seed")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= serve_load.MAX_REQUESTS or not 1 <= args.steps <= 1000:
        p.error(f"--requests must be 1-{serve_load.MAX_REQUESTS} and --steps 1-1000")
    if not 0 <= args.batch_concurrency <= serve_load.MAX_CONCURRENCY:
        p.error(f"--batch-concurrency must be 0-{serve_load.MAX_CONCURRENCY}")
    levels = parse_levels(args.concurrency)
    stream = build_stream(load_prompts(args.prompts), args.requests, args.zipf, args.near, args.seed)
    began = time.monotonic()
    per_step = macs_per_step(args.model)
    runs, batching = [], []
    for c in levels:
        off, off_images, _ = serve_run(stream, args.model, args.steps, c, False, [], args.timeout, True)
        on, on_images, _ = serve_run(stream, args.model, args.steps, c, True, [], args.timeout, True)
        for run in (off, on):
            run["macs_saved"] = run["steps_skipped"] * per_step
            run["compute_saved"] = run["steps_skipped"] / (run["answered"] * args.steps) if run["answered"] else None
        on["quality"] = quality(stream, on["hit_requests"], on_images, off_images)
        runs += [off, on]
    if args.batch_concurrency:
        for flags in (BATCH_OFF, []):
            run, _, _ = serve_run(stream, args.model, args.steps, args.batch_concurrency, False, flags,
                                  args.timeout, False)
            run["batching"] = not flags
            batching.append(run)
    out = {"meta": {"command": "python bench/serve_workload.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "model": args.model,
                    "steps": args.steps, "requests": args.requests, "sampler": "ddim",
                    "zipf": args.zipf, "near": args.near, "seed": args.seed, "prompts": args.prompts,
                    "threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
                    "macs_per_step": per_step,
                    "macs_per_step_how": "count_macs(2-step generation) - count_macs(1-step generation)",
                    "steps_skipped_how": "each response's sdinfer[0].steps_skipped",
                    "wall_s": time.monotonic() - began},
           "stream": stream,
           "stream_summary": {"distinct_prompts": len({r["prompt"] for r in stream}),
                              "distinct_bases": len({r["base"] for r in stream}),
                              "near_duplicates": sum(1 for r in stream if r["changed"])},
           "runs": runs, "batching": batching}
    print(serve_workload_table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
