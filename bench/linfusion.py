"""LinFusion (linear stand-ins of a UNet's self-attention): quality, and cost against resolution.

Quality (``--quality``; deterministic): the held-out prompts (one seed per prompt, the seeds
every bench uses) at DDIM ``--steps`` with guidance ``--cfg`` on each ``--model``, with and without
``sdinfer.accelerate(pipe, "linfusion")`` (the shipped weights beside the model): PSNR / SSIM of
the linear model's images against the softmax model's, and the adherence of both.

Cost (``--cost``; time it on an otherwise idle machine: it holds /tmp/bench.lock while timing):
against the token count n, softmax vs linear, the median of ``--repeats`` calls, with the peak of
the memory torch allocates during the call (torch.profiler's allocation records summed in order;
CPU torch has no allocator statistics):

- one self-attention layer alone (the default UNet's 8x8 layer, 64 wide, 4 heads, and an SD 1.5
  first-level layer, 320 wide, 8 heads, random weights), n = side^2 up to ``--max-tokens``;
- one denoiser call (batch 1, no guidance) of the default UNet at image sides 32 .. ``--unet-sides``
  (its self-attention sees (side / 4)^2 tokens) and of a random-weight UNet2DConditionModel with
  SD 1.5's config (speed only: its weights are random) at latent sides ``--sd-sides`` (its first
  level's self-attention sees side^2 tokens), with untrained linear stand-ins (the cost does not
  depend on the weights).

    PYTHONPATH=src python bench/linfusion.py --quality --model unet --json bench/results/linfusion-unet.json
    PYTHONPATH=src python bench/linfusion.py --cost --json bench/results/linfusion-cost.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from sdinfer.cli import _quiet_libraries
from sdinfer.distill import linfusion as lf
from sdinfer.eval.adherence import adherence_rate
from sdinfer.eval.bench import generate_images, machine_description
from sdinfer.eval.metrics import psnr, ssim
from sdinfer.eval.prompts import load_prompts

SEED = 0
LOCK = Path("/tmp/bench.lock")

SD15_UNET = dict(   # diffusers' config of Stable Diffusion 1.5's UNet
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)


# ---- quality -------------------------------------------------------------------------------
def generate(pipe, prompts: list[str], steps: int, cfg: float, batch: int):
    return generate_images(pipe, prompts, steps, cfg, batch, SEED)


def adherence(pixels, prompts):
    rate = adherence_rate([(p.permute(1, 2, 0).numpy() * 255).round() for p in pixels], prompts)
    return None if rate is None else round(rate, 4)


def quality(model: str, prompts: list[str], steps: int, cfg: float, batch: int, weights: str = "") -> dict:
    import sdinfer
    from sdinfer.models import artifacts
    from sdinfer.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model)
    start = time.time()
    reference = generate(pipe, prompts, steps, cfg, batch)
    softmax_s = time.time() - start
    handle = sdinfer.accelerate(pipe, f"linfusion:weights={weights}" if weights else "linfusion")
    try:
        start = time.time()
        linear = generate(pipe, prompts, steps, cfg, batch)
        linear_s = time.time() - start
    finally:
        handle.remove()
    _, meta = artifacts.read(weights or artifacts.find(pipe.model.path, lf.KIND), "linfusion weights", lf.DISTILL,
                             json_keys=("training_steps", "train_config"))
    row = {"model": model, "size": pipe.model.native_size, "prompts": len(prompts), "steps": steps, "cfg": cfg,
           "psnr": round(psnr(linear, reference), 2), "ssim": round(ssim(linear, reference), 4),
           "adherence_softmax": adherence(reference, prompts), "adherence_linfusion": adherence(linear, prompts),
           "self_attention_layers": len(lf.self_attention_layers(pipe.model.denoiser)),
           "training_steps": meta.get("training_steps"), "train_config": meta.get("train_config"),
           "generation_s_softmax": round(softmax_s, 1), "generation_s_linfusion": round(linear_s, 1),
           "timing_note": "generation seconds on a shared machine, not a timing run"}
    print(json.dumps({k: v for k, v in row.items() if k != "train_config"}), file=sys.stderr, flush=True)
    return row


# ---- cost ----------------------------------------------------------------------------------
def peak_allocated(fn) -> int:
    """Peak bytes torch allocates (above what was held before) while ``fn()`` runs, from the
    profiler's allocation and free records in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # an allocation is attributed to the innermost op that makes it (its self usage); a free is a
    # "[memory]" record of its own
    records = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                     for e in prof.profiler.function_events)
    held = peak = 0
    for _, change in records:
        held += change
        peak = max(peak, held)
    return peak


def timed(fn, repeats: int) -> float:
    fn()   # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attention_layer(dim: int, heads: int):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False, out_bias=True).eval()


def layer_rows(name: str, dim: int, heads: int, sides: list[int], repeats: int) -> list[dict]:
    attn = attention_layer(dim, heads)
    linear = lf.LinearSelfAttention.from_attention(attn, dim).eval()
    rows = []
    for side in sides:
        x = torch.randn(1, side * side, dim)
        calls = {"softmax": lambda: attn(x), "linear": lambda: lf.run_in_place_of(attn, linear, x)}
        row = {"what": name, "tokens": side * side}
        with torch.no_grad():
            for kind, fn in calls.items():
                row[f"{kind}_ms"] = round(1e3 * timed(fn, repeats), 3)
                row[f"{kind}_peak_mb"] = round(peak_allocated(fn) / 2**20, 3)
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def denoiser_rows(name: str, unet, sides: list[int], channels: int, text, tokens_at, repeats: int,
                  note: str) -> list[dict]:
    from sdinfer.cache.base import CacheHandle
    from sdinfer.models.calling import call_denoiser

    modules = lf.build_modules(unet)
    rows = []
    for side in sides:
        x = torch.randn(1, channels, side, side)
        t = torch.tensor([500])
        row = {"what": name, "side": side, "self_attention_tokens": tokens_at(side), "note": note}
        with torch.no_grad():
            for kind in ("softmax", "linear"):
                handle = CacheHandle("linfusion-bench")
                if kind == "linear":
                    lf.mount(unet, modules, handle)
                try:
                    fn = lambda: call_denoiser(unet, x, t, text)
                    row[f"{kind}_ms"] = round(1e3 * timed(fn, repeats), 2)
                    row[f"{kind}_peak_mb"] = round(peak_allocated(fn) / 2**20, 2)
                finally:
                    handle.remove()
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


@contextlib.contextmanager
def bench_lock():
    while LOCK.exists():
        print("waiting for /tmp/bench.lock", file=sys.stderr, flush=True)
        time.sleep(10)
    LOCK.write_text(f"bench/linfusion.py {os.getpid()}\n")
    try:
        yield
    finally:
        LOCK.unlink(missing_ok=True)


def cost(args) -> dict:
    from diffusers import UNet2DConditionModel

    from sdinfer.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("unet")
    text = pipe.encode(["a red circle"])
    torch.manual_seed(0)
    sd = UNet2DConditionModel(**SD15_UNET).eval()
    sd_text = torch.randn(1, 77, 768)
    with bench_lock():
        rows = layer_rows("default UNet self-attention layer (64 wide, 4 heads)", 64, 4, args.layer_sides,
                          args.repeats)
        rows += layer_rows("SD 1.5 first-level self-attention layer (320 wide, 8 heads, random weights)", 320, 8,
                           args.layer_sides, args.repeats)
        rows += denoiser_rows("default UNet, one call (batch 1)", pipe.model.denoiser, args.unet_sides, 3, text,
                              lambda side: (side // 4) ** 2, args.repeats, "trained weights, untrained stand-ins")
        rows += denoiser_rows("SD 1.5-shaped UNet2DConditionModel, one call (batch 1)", sd, args.sd_sides, 4,
                              sd_text, lambda side: side * side, max(1, args.repeats // 2),
                              "random weights: speed only")
    return {"rows": rows, "threads": torch.get_num_threads(),
            "memory_note": "peak bytes torch allocated during the call (profiler allocation records); "
                           "torch's CPU scaled_dot_product_attention may not materialise the n x n matrix"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quality", action="store_true")
    p.add_argument("--cost", action="store_true")
    p.add_argument("--model", action="append", default=[], help="model(s) for --quality (default: unet)")
    p.add_argument("--weights", default="", help="a linfusion weights file (default: the one beside the model)")
    p.add_argument("--prompts", default="heldout")
    p.add_argument("--limit", type=int, default=0, help="the first N prompts only")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layer-sides", type=int, nargs="+", default=[8, 16, 32, 64, 96])
    p.add_argument("--unet-sides", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    p.add_argument("--sd-sides", type=int, nargs="+", default=[16, 32, 48, 64])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    _quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {"machine": machine_description(), "threads": torch.get_num_threads(),
                    "date": time.strftime("%Y-%m-%d"),
                    "command": "PYTHONPATH=src python bench/linfusion.py " + " ".join(sys.argv[1:])}
    if args.quality:
        prompts = load_prompts(args.prompts)
        prompts = prompts[:args.limit] if args.limit else prompts
        report["quality"] = [quality(m, prompts, args.steps, args.cfg, args.batch, args.weights) for m in args.model or ["unet"]]
    if args.cost:
        report["cost"] = cost(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
