"""DiTFastAttn on a default DiT: each threshold's plan against full attention, and what attention
costs as the image grows.

Quality (deterministic, needs no idle machine): the held-out prompts (one seed per prompt, the
seeds every bench uses) at DDIM ``--steps`` with guidance ``--cfg``, full attention and each
``--thresholds`` plan (the ones shipped beside the model, window ``--window``); per plan the
attention FLOPs against full attention (``attention_flops``: the paper's count), the whole
generation's MACs (torch's counter, the CPU attention kernel included, so the window's real
blocks are what is counted), PSNR / SSIM against full attention's images and adherence.

Timing (``--timing-prompts N``; on an otherwise idle machine): full attention and each plan on the
first N prompts, interleaved (``eval.bench.measure_all``), the median of ``--repeats``.

Stacks (``--stack "SPEC @ SAMPLER:STEPS"``, repeatable): an accelerator spec (DiTFastAttn with a
cache, joined by +) at a sampler's step count against ``--stack-reference`` (DDIM 50), quality and
wall time interleaved with the reference on the timing prompts.

Cost against resolution (``--sizes``): the time and peak memory of one denoiser call (a guided
batch of 2) per image size, full attention against the window (every layer windowed, as a plan's
window steps run), on the default DiT's architecture built for each size and on a PixArt-Sigma-shaped DiT with random
weights (``--pixart-layers`` of its 28 blocks, speed only).

    PYTHONPATH=src python bench/ditfastattn.py --model dit-64 --steps 20 --timing-prompts 50 \
        --json bench/results/ditfastattn-dit-64.json
    PYTHONPATH=src python bench/ditfastattn.py --sizes 32,64,128,256 --pixart-latents 32,64,128 \
        --json bench/results/ditfastattn-resolution.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers.hooks import ModelHook

from sdinfer.cache import ditfastattn as dfa
from sdinfer.cache.base import CacheHandle
from sdinfer.cli import _quiet_libraries
from sdinfer.eval.adherence import adherence_rate
from sdinfer.eval.bench import RunSpec, generate_images, machine_description, measure_all
from sdinfer.eval.cost import call_peak_mb, count_macs
from sdinfer.eval.metrics import psnr, ssim
from sdinfer.eval.prompts import load_prompts
from sdinfer.pipeline import Pipeline

SEED = 0


def spec_of(threshold: float, window: int) -> str:
    return f"ditfastattn:threshold={threshold:g},window_size={window}"


def generate(pipe: Pipeline, prompts: list[str], steps: int, cfg: float, batch: int, spec: str = "",
             sampler: str = "ddim") -> torch.Tensor:
    return generate_images(pipe, prompts, steps, cfg, batch, SEED, sampler, spec)


def one_generation_macs(pipe: Pipeline, prompt: str, steps: int, cfg: float, spec: str = "", sampler: str = "ddim"):
    return count_macs(lambda: generate(pipe, [prompt], steps, cfg, 1, spec, sampler))


def quality_values(pixels: torch.Tensor, reference: torch.Tensor, prompts: list[str]) -> dict:
    images = [(p.permute(1, 2, 0).numpy() * 255).round() for p in pixels]
    adherence = adherence_rate(images, prompts)
    return {"psnr": round(psnr(pixels, reference), 2), "ssim": round(ssim(pixels, reference), 4),
            "adherence": None if adherence is None else round(adherence, 4)}


def plan_row(pipe: Pipeline, threshold: float, window: int, steps: int, guided: bool) -> dict:
    plans = dfa.plans_for(pipe.model.denoiser, dfa.DiTFastAttnConfig(threshold=threshold, window_size=window))
    if steps not in plans:
        raise SystemExit(f"no {steps}-step plan for threshold {threshold:g}, window {window}: run "
                         f"`sdinfer calibrate ditfastattn --model {pipe.model.name} --steps {steps}`")
    plan = plans[steps]
    return {"attention_fraction": round(dfa.attention_flops(plan, guided=guided)["fraction"], 4),
            "methods": {k: v for k, v in plan.counts().items() if v}}


def quality(args, pipe: Pipeline, prompts: list[str], save) -> list[dict]:
    reference = generate(pipe, prompts, args.steps, args.cfg, args.batch)
    base_macs = one_generation_macs(pipe, prompts[0], args.steps, args.cfg)
    rows = [{"config": "full attention", "threshold": 0.0, "attention_fraction": 1.0, "macs": base_macs,
             "macs_fraction": 1.0, **quality_values(reference, reference, prompts)}]
    save(rows)
    for threshold in args.thresholds:
        spec = spec_of(threshold, args.window)
        row = {"config": spec, "threshold": threshold, **plan_row(pipe, threshold, args.window, args.steps, args.cfg != 1)}
        macs = one_generation_macs(pipe, prompts[0], args.steps, args.cfg, spec)
        row.update({"macs": macs, "macs_fraction": round(macs / base_macs, 4)})
        row.update(quality_values(generate(pipe, prompts, args.steps, args.cfg, args.batch, spec), reference, prompts))
        print(f"{spec}: {row}", file=sys.stderr, flush=True)
        rows.append(row)
        save(rows)
    return rows


def timing(args, pipe: Pipeline, prompts: list[str]) -> list[dict]:
    specs = [RunSpec(steps=args.steps, cfg=args.cfg)] + \
        [RunSpec(steps=args.steps, cfg=args.cfg, accelerate=spec_of(t, args.window)) for t in args.thresholds]
    found = measure_all(pipe, specs, prompts, args.batch, SEED, args.repeats)
    base = found[0]
    return [{"config": s.accelerate or "full attention", "wall_s": round(m.wall_s, 3),
             "wall_s_runs": [round(w, 3) for w in m.wall_runs], "speedup": round(base.wall_s / m.wall_s, 3),
             "psnr": round(psnr(m.pixels, base.pixels), 2)} for s, m in zip(specs, found)]


def stacks(args, pipe: Pipeline, prompts: list[str], timing_prompts: list[str], kept: list[dict]) -> list[dict]:
    """Each ``SPEC @ SAMPLER:STEPS`` against ``--stack-reference`` (full attention, no cache): quality
    (``kept``, the file's rows, under --no-quality) and wall time on the timing prompts."""
    ref_sampler, _, ref_steps = args.stack_reference.rpartition(":")
    configs = [(ref_sampler, int(ref_steps), "")]
    for stack in args.stack:
        spec, _, sampler_steps = (part.strip() for part in stack.partition("@"))
        sampler, _, steps = sampler_steps.rpartition(":")
        configs.append((sampler, int(steps), spec))
    labels = [f"{spec or 'full attention'} + {sampler}:{steps}" for sampler, steps, spec in configs]
    if args.no_quality:
        by_label = {r["config"]: r for r in kept}
        rows = [by_label.get(label, {"config": label, "nfe": steps}) for label, (_, steps, _) in zip(labels, configs)]
    else:
        reference = generate(pipe, prompts, configs[0][1], args.cfg, args.batch, "", configs[0][0])
        rows = []
        for label, (sampler, steps, spec) in zip(labels, configs):
            pixels = reference if not spec and (sampler, steps) == configs[0][:2] else \
                generate(pipe, prompts, steps, args.cfg, args.batch, spec, sampler)
            rows.append({"config": label, "nfe": steps, **quality_values(pixels, reference, prompts)})
    if timing_prompts:
        specs = [RunSpec(sampler=s, steps=n, cfg=args.cfg, accelerate=spec) for s, n, spec in configs]
        found = measure_all(pipe, specs, timing_prompts, args.batch, SEED, args.repeats)
        for row, m in zip(rows, found):
            row.update({"wall_s": round(m.wall_s, 3), "speedup": round(found[0].wall_s / m.wall_s, 3)})
    return rows


# ---- cost against resolution ---------------------------------------------------------------
def pixart_shaped(layers: int) -> torch.nn.Module:
    """A PixArt-Sigma-shaped transformer (its width, heads, patch and caption size; ``layers`` of its
    28 blocks), random weights: for speed only."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_layers=layers, sample_size=128, in_channels=4, out_channels=8,
                                    num_attention_heads=16, attention_head_dim=72, cross_attention_dim=1152,
                                    caption_channels=4096, norm_type="ada_norm_single", use_additional_conditions=False,
                                    interpolation_scale=2).eval()


def time_call(call, repeats: int) -> tuple[float, float]:
    """Median seconds of ``call()`` over ``repeats`` runs after one warm-up, and the peak memory it
    adds to the process (MiB, ``call_peak_mb``)."""
    gc.collect()
    call()
    gc.collect()
    peak = call_peak_mb(call)
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        walls.append(time.perf_counter() - start)
    return statistics.median(walls), peak


class WindowOnly(ModelHook):
    """On an attention module: every call runs window attention only (a plan's window step without
    its residual), for timing."""

    def __init__(self, window: dfa.Window):
        super().__init__()
        self.window = window

    def new_forward(self, module, *args, **kwargs):
        return self.window(self.fn_ref.original_forward, args, kwargs)


def windowed(model: torch.nn.Module, call, window: int):
    """``call`` with every self-attention layer of ``model`` running window attention only (each
    layer's window made once, as ``apply_ditfastattn`` makes them)."""
    windows = [(module, dfa.Window(window, dfa.text_first(model), unit)) for unit, module in dfa.self_attentions(model)]

    def run():
        handle = CacheHandle("window-only")
        try:
            for module, win in windows:
                handle.register(module, WindowOnly(win), "window_only")
            return call()
        finally:
            handle.remove()
    return run


def resolution_rows(name: str, make_call, sizes: list[int], windows: list[int], repeats: int,
                    label: str) -> list[dict]:
    rows = []
    for size in sizes:
        model, call = make_call(size)
        with torch.no_grad():
            full_s, full_mb = time_call(call, repeats)
            row = {"model": name, "label": label, "size": size, "full_s": round(full_s, 4),
                   "full_peak_mb": round(full_mb, 1)}
            for window in windows:
                win_s, win_mb = time_call(windowed(model, call, window), repeats)
                row.update({f"window{window}_s": round(win_s, 4), f"window{window}_peak_mb": round(win_mb, 1),
                            f"window{window}_speedup": round(full_s / win_s, 3)})
        print(row, file=sys.stderr, flush=True)
        rows.append(row)
        del model, call
    return rows


def default_dit_call(size: int):
    """The default DiT's architecture at ``size`` (random weights: a call costs what the trained one's does)."""
    from sdinfer.models.default.architectures import build_denoiser

    net = build_denoiser("dit", 0, resolution=size).eval()
    text = torch.randn(2, 16, net.config.joint_attention_dim)
    pooled = torch.randn(2, net.config.pooled_projection_dim)
    x = torch.randn(2, net.config.in_channels, size, size)
    return net, lambda: net(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                            timestep=torch.tensor([500.0, 500.0]))


def pixart_call(layers: int):
    model = pixart_shaped(layers)
    text = torch.randn(2, 16, 4096)

    def make(latent: int):
        x = torch.randn(2, 4, latent, latent)
        return model, lambda: model(x, encoder_hidden_states=text, timestep=torch.tensor([500, 500]),
                                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return make


def resolution(args) -> list[dict]:
    rows = []
    if args.sizes:
        rows += resolution_rows("default DiT architecture", default_dit_call, args.sizes, args.resolution_windows,
                                args.repeats, "image side in px; random weights (a call costs what the trained one's does)")
    if args.pixart_latents:
        rows += resolution_rows(f"PixArt-Sigma-shaped ({args.pixart_layers} of 28 blocks)",
                                pixart_call(args.pixart_layers), args.pixart_latents, args.pixart_windows,
                                args.repeats, "latent side (image px = 8x); random weights, speed only")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dit")
    p.add_argument("--thresholds", default="0.01,0.025,0.05,0.075,0.1")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--prompts", default="heldout")
    p.add_argument("--limit", type=int, default=0, help="the first N prompts only (quality)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--timing-prompts", type=int, default=0, help="time on the first N prompts (0: no timing)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stack", action="append", default=[], help="SPEC @ SAMPLER:STEPS (repeatable)")
    p.add_argument("--stack-reference", default="ddim:50")
    p.add_argument("--sizes", default="", help="image sides for the cost against resolution (default model)")
    p.add_argument("--resolution-windows", default="128")
    p.add_argument("--pixart-latents", default="", help="latent sides for the PixArt-shaped model")
    p.add_argument("--pixart-layers", type=int, default=2)
    p.add_argument("--pixart-windows", default="512")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    ints = lambda text: [int(v) for v in text.split(",") if v.strip()]   # noqa: E731
    args.thresholds = [float(v) for v in args.thresholds.split(",") if v.strip()]
    args.sizes, args.pixart_latents = ints(args.sizes), ints(args.pixart_latents)
    args.resolution_windows, args.pixart_windows = ints(args.resolution_windows), ints(args.pixart_windows)
    _quiet_libraries()
    torch.manual_seed(0)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "PYTHONPATH=src python bench/ditfastattn.py " + " ".join(
        f"'{a}'" if (" " in a or "@" in a) else a for a in (argv or sys.argv[1:]))
    # a run adds its parts to the file (a quality run, then a timing run on an idle machine)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update({"model": args.model, "steps": args.steps, "cfg": args.cfg, "window": args.window,
                   "machine": machine_description(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__})
    result["commands"] = [*result.get("commands", []), command]

    def save(rows, key="rows"):
        result[key] = rows
        out.write_text(json.dumps(result, indent=1))

    start = time.time()
    if (args.sizes or args.pixart_latents) and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        # large tensors mapped and unmapped on each call, so the peak memory of each is seen
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    if args.sizes or args.pixart_latents:
        save(resolution(args), "resolution")
    else:
        pipe = Pipeline.from_pretrained(args.model)
        prompts = load_prompts(args.prompts)
        prompts = prompts[:args.limit] if args.limit else prompts
        timed = prompts[:args.timing_prompts]
        result["n_prompts"] = len(prompts)
        if timed:
            result["timing_prompts"] = len(timed)
        if not args.no_quality:
            quality(args, pipe, prompts, save)
        if timed:
            save(timing(args, pipe, timed), "timing")
        if args.stack:
            save(stacks(args, pipe, prompts, timed, result.get("stacks", [])), "stacks")
    result["seconds"] = round(time.time() - start, 1)
    save(result.get("rows", []))
    print(json.dumps({k: v for k, v in result.items() if k in ("rows", "timing", "stacks", "resolution")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
