"""Quantization on a default model: each method and width against full precision.

Quality run (deterministic, needs no idle machine): for every configuration, the held-out
prompts (one seed per prompt, the seeds every bench uses) at DDIM ``--steps`` with guidance
``--cfg``; PSNR / SSIM against the full-precision images of the same run, adherence, bits per
quantized weight (codes, tables and scales), the denoiser's size on disk (the folder
``sdinfer quantize`` writes, or the safetensors of a half-precision copy), its memory (its
parameters and buffers) and the calibration cost.  Our formats are simulated (dequantize, then a
float matmul): their speed column says "simulated".

Stacks (``--stack``): a quantized model under a cache and a fast sampler (``SPEC @ CACHE @
SAMPLER:STEPS``) and the same without quantization, against ``--stack-reference`` (DDIM 50 at
full precision).

Timing run (``--timing``; on an otherwise idle machine): the configurations with real kernels
(half precision, torchao's int8 configs, torch's dynamic int8 Linear) against float32,
interleaved (``eval.bench.measure_all``), the median of ``--repeats``.

    PYTHONPATH=src python bench/quantize.py --model unet --json bench/results/quant-unet.json
    PYTHONPATH=src python bench/quantize.py --model dit --timing --json bench/results/quant-timing-dit.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdinfer.cli import _quiet_libraries
from sdinfer.eval.adherence import adherence_rate
from sdinfer.eval.bench import RunSpec, machine_description, measure_all
from sdinfer.eval.metrics import psnr, ssim
from sdinfer.eval.prompts import load_prompts
from sdinfer.pipeline import Pipeline

SEED = 0
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
KERNELS = ("torchao-int8-dynamic", "torchao-int8-weight", "torch-dynamic-int8")


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def generate(pipe: Pipeline, prompts: list[str], steps: int, cfg: float, batch: int, sampler: str = "ddim"):
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        out.append(pipe(chunk, steps=steps, sampler=sampler, guidance_scale=cfg,
                        seeds=[SEED + i + j for j in range(len(chunk))]).pixels)
    return torch.cat(out)


def half_file_mb(pipe: Pipeline, dtype: torch.dtype) -> float:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "denoiser.safetensors"
        save_file({k: v.detach().to(dtype).contiguous() if v.is_floating_point() else v.contiguous()
                   for k, v in pipe.model.denoiser.state_dict().items()}, str(file))
        return file.stat().st_size / 2**20


def quantized_file_mb(handle, pipe: Pipeline) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = handle.save(Path(tmp) / "q", source=pipe.model.path)
        return sum(f.stat().st_size for f in out.glob("*/sdinfer_quantized.safetensors")) / 2**20


_SAVE = None   # writes the rows so far (a long run cut short keeps what it measured)


def quality_row(label: str, pixels, reference, prompts, extra: dict) -> dict:
    images = [(p.permute(1, 2, 0).numpy() * 255).round() for p in pixels]
    adherence = adherence_rate(images, prompts)
    row = {"config": label, "psnr": round(psnr(pixels, reference), 2), "ssim": round(ssim(pixels, reference), 4),
           "adherence": None if adherence is None else round(adherence, 4)}
    row.update(extra)
    print(f"{label}: {row['psnr']} dB, adherence {row['adherence']}", file=sys.stderr, flush=True)
    if _SAVE is not None:
        _SAVE(row)
    return row


def quality(args, prompts: list[str]) -> dict:
    from sdinfer.quant import CalibrationConfig, quantize
    from sdinfer.quant.kernels import apply_kernel

    pipe = Pipeline.from_pretrained(args.model)
    calibration = CalibrationConfig(prompts=args.calibration_prompts, steps=args.calibration_steps,
                                    guidance_scale=args.cfg)
    reference = generate(pipe, prompts, args.steps, args.cfg, args.batch)
    fp_mb = half_file_mb(pipe, torch.float32)
    rows = [quality_row("fp32", reference, reference, prompts,
                        {"bits_per_weight": 32.0, "file_mb": round(fp_mb, 3),
                         "model_mb": round(model_bytes(pipe.model.denoiser) / 2**20, 3), "speed": "reference"})]
    for config in args.configs:
        if config in HALF:
            half = Pipeline.from_pretrained(args.model, dtype=HALF[config])
            pixels = generate(half, prompts, args.steps, args.cfg, args.batch)
            rows.append(quality_row(config, pixels, reference, prompts, {
                "bits_per_weight": 16.0, "file_mb": round(half_file_mb(pipe, HALF[config]), 3),
                "model_mb": round(model_bytes(half.model.denoiser) / 2**20, 3), "speed": "timed"}))
            del half
            continue
        if config in KERNELS:
            restore = apply_kernel(pipe.model.denoiser, config)
            try:
                pixels = generate(pipe, prompts, args.steps, args.cfg, args.batch)
                rows.append(quality_row(config, pixels, reference, prompts, {
                    "bits_per_weight": 8.0, "model_mb": round(model_bytes(pipe.model.denoiser) / 2**20, 3),
                    "speed": "timed"}))
            finally:
                restore()
            continue
        start = time.perf_counter()
        handle = quantize(pipe, config, calibration)
        seconds = time.perf_counter() - start
        try:
            pixels = generate(pipe, prompts, args.steps, args.cfg, args.batch)
            summary = handle.summary()
            rows.append(quality_row(handle.spec, pixels, reference, prompts, {
                "bits_per_weight": summary["bits_per_weight"], "formats": summary["formats"],
                "file_mb": round(quantized_file_mb(handle, pipe), 3),
                "model_mb": round(model_bytes(pipe.model.denoiser) / 2**20, 3), "speed": "simulated",
                "quantize_s": round(seconds, 1), "calibration": summary["calibration"]}))
        finally:
            handle.remove()
    return {"rows": rows, "stacks": stacks(args, pipe, prompts, calibration) if args.stack else []}


def stacks(args, pipe: Pipeline, prompts: list[str], calibration) -> list[dict]:
    """Each ``QUANT @ CACHE @ SAMPLER:STEPS`` and the same at full precision, against the reference."""
    import sdinfer
    from sdinfer.quant import quantize

    ref_sampler, _, ref_steps = args.stack_reference.partition(":")
    reference = generate(pipe, prompts, int(ref_steps), args.cfg, args.batch, ref_sampler)
    rows = [quality_row(f"{args.stack_reference} fp32", reference, reference, prompts, {"nfe": int(ref_steps)})]
    for stack in args.stack:
        quant_spec, cache_spec, sampler_steps = (part.strip() for part in stack.split("@"))
        sampler, _, steps = sampler_steps.rpartition(":")
        for quantized in (False, True):
            handle = quantize(pipe, quant_spec, calibration) if quantized else None
            cache = sdinfer.accelerate(pipe, cache_spec) if cache_spec else None
            try:
                pixels = generate(pipe, prompts, int(steps), args.cfg, args.batch, sampler)
            finally:
                if cache is not None:
                    cache.remove()
                if handle is not None:
                    handle.remove()
            label = f"{quant_spec if quantized else 'fp32'} + {cache_spec or 'no cache'} + {sampler_steps}"
            rows.append(quality_row(label, pixels, reference, prompts, {"nfe": int(steps)}))
    return rows


def timing(args, prompts: list[str]) -> dict:
    """Real-kernel configurations against float32, interleaved on one pipeline each."""
    from sdinfer.quant.kernels import apply_kernel

    pipe = Pipeline.from_pretrained(args.model)
    spec = RunSpec(steps=args.steps, cfg=args.cfg)
    kernels = [k for k in args.configs if k in KERNELS]
    specs = [spec] + [RunSpec(steps=args.steps, cfg=args.cfg, accelerate=k) for k in kernels]

    def install(s: RunSpec):
        return apply_kernel(pipe.model.denoiser, s.accelerate) if s.accelerate else (lambda: None)

    found = measure_all(pipe, specs, prompts, args.batch, SEED, args.repeats, install=install)
    base = found[0]
    rows = [{"config": s.accelerate or "fp32", "wall_s": round(m.wall_s, 3), "speedup": round(base.wall_s / m.wall_s, 3),
             "psnr": round(psnr(m.pixels, base.pixels), 2)} for s, m in zip(specs, found)]
    for name in (c for c in args.configs if c in HALF):   # a pipeline of its own, timed beside float32
        half = Pipeline.from_pretrained(args.model, dtype=HALF[name])
        pair = [measure_all(p, [spec], prompts, args.batch, SEED, args.repeats)[0] for p in (pipe, half)]
        rows.append({"config": name, "wall_s": round(pair[1].wall_s, 3), "fp32_wall_s": round(pair[0].wall_s, 3),
                     "speedup": round(pair[0].wall_s / pair[1].wall_s, 3),
                     "psnr": round(psnr(pair[1].pixels, pair[0].pixels), 2)})
    return {"rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="unet")
    p.add_argument("--configs", default="", help="';'-separated: bf16, fp16, a kernel name or a quantization spec")
    p.add_argument("--stack", action="append", default=[], help="QUANT @ CACHE @ SAMPLER:STEPS (repeatable)")
    p.add_argument("--stack-reference", default="ddim:50")
    p.add_argument("--prompts", default="heldout")
    p.add_argument("--limit", type=int, default=0, help="the first N prompts only")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--calibration-prompts", type=int, default=8)
    p.add_argument("--calibration-steps", type=int, default=20)
    p.add_argument("--timing", action="store_true", help="time the real-kernel configurations instead")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(";") if c.strip()]
    _quiet_libraries()
    torch.manual_seed(0)
    prompts = load_prompts(args.prompts)
    prompts = prompts[:args.limit] if args.limit else prompts
    start = time.time()
    header = {"model": args.model, "steps": args.steps, "cfg": args.cfg, "prompts": args.prompts,
              "n_prompts": len(prompts), "machine": machine_description(), "date": time.strftime("%Y-%m-%d"),
              "command": "PYTHONPATH=src python bench/quantize.py " + " ".join(
                  f"'{a}'" if (" " in a or ";" in a) else a for a in (argv or sys.argv[1:]))}
    partial = {"rows": [], "stacks": []}

    def save(row):
        partial["stacks" if "nfe" in row else "rows"].append(row)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**partial, **header, "partial": True}, indent=1))
    global _SAVE
    _SAVE = None if args.timing else save
    result = timing(args, prompts) if args.timing else quality(args, prompts)
    result.update({"model": args.model, "steps": args.steps, "cfg": args.cfg, "prompts": args.prompts,
                   "n_prompts": len(prompts), "machine": machine_description(),
                   "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - start, 1),
                   "command": "PYTHONPATH=src python bench/quantize.py " + " ".join(
                       f"'{a}'" if (" " in a or ";" in a) else a for a in (argv or sys.argv[1:]))})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["rows"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
