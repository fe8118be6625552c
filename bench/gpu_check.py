"""The Python half of bench/gpu_check.sh: the torch.compile check, the CFG-parallel comparison,
and the one table of everything the script ran.

    python bench/gpu_check.py compile --model dit --cache fora:interval=2 --device cuda --dtype float16 --out R.jsonl
    python bench/gpu_check.py compare A.png B.png --check NAME --out R.jsonl
    python bench/gpu_check.py bench-rows BENCH.json --check NAME --out R.jsonl
    python bench/gpu_check.py table R.jsonl

Every check appends one JSON line to the results file: check, device, dtype, status (ok / FAIL),
seconds, and a note; ``table`` prints them as one markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROMPTS = ["a red circle in the top left", "a blue square in the bottom right"]


def append(out: str, **row) -> None:
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_check(args) -> int:
    """Eager, then torch.compile on the denoiser with a cache installed: does it compile, does
    it recompile (dynamo's counters: frames compiled in the first compiled run, and again in
    the runs after it, which a model compiled once for every step variant would not need), how
    fast against eager."""
    from sdinfer.devices import resolve_device

    device = resolve_device(args.device)
    check = f"compile {args.model} + {args.cache or 'no cache'} ({args.backend})"
    try:
        return _compile_check(args, device, check)
    except Exception as err:  # noqa: BLE001 - the check reports whatever stops the compile
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        append(args.out, check=check, device=str(device), dtype=args.dtype, status="FAIL",
               seconds=None, note=f"{type(err).__name__}: {first_line}")
        return 1


def _compile_check(args, device, check) -> int:
    import torch._dynamo
    from torch._dynamo.utils import counters

    import sdinfer
    from sdinfer.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.model, device=device, dtype=args.dtype)
    if args.cache:
        sdinfer.accelerate(pipe, args.cache)

    def run() -> float:
        _sync(device)
        start = time.perf_counter()
        pipe(PROMPTS, steps=args.steps, sampler="ddim")
        _sync(device)
        return time.perf_counter() - start

    run()                                   # warm-up (kernels, allocator)
    eager = min(run() for _ in range(args.repeats))
    torch._dynamo.reset()
    counters.clear()
    pipe.model.denoiser.compile(backend=args.backend, mode=args.mode)
    first = run()                           # compiles
    frames_first, graphs_first = counters["frames"]["total"], counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    second = min(run() for _ in range(args.repeats))
    # a compiled model that recompiles every call compiles again in every later run
    recompiled = counters["frames"]["total"] - frames_first
    note = (f"eager {eager:.3f} s, compiled {second:.3f} s ({eager / second:.2f}x), first compiled run "
            f"{first:.1f} s: {frames_first} frames compiled, {graphs_first} graphs, {breaks} graph "
            f"breaks; {recompiled} frames compiled again in the next {args.repeats} runs")
    append(args.out, check=check, device=str(device), dtype=args.dtype,
           status="RECOMPILES" if recompiled else "ok", seconds=round(second, 3), note=note)
    return 0


def compare(args) -> int:
    """Two PNGs written by two runs that should agree (one device against two ranks)."""
    import numpy as np
    import torch
    from PIL import Image

    from sdinfer.eval.metrics import psnr

    a, b = (torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255)
            .permute(2, 0, 1)[None] for p in (args.a, args.b))
    value = psnr(b, a)
    append(args.out, check=args.check, device=args.device, dtype=args.dtype,
           status="ok" if value >= args.min_psnr else "FAIL", seconds=None,
           note=f"PSNR {value:.1f} dB against one device")
    return 0


def bench_rows(args) -> int:
    """One row per configuration of an ``sdinfer bench --json`` file."""
    report = json.loads(Path(args.json).read_text())
    for rec in report["records"]:
        note = ", ".join(f"{k} {rec[k]}" for k in ("speedup_wall", "speedup_macs", "psnr", "peak_mem_mb")
                         if k in rec)
        append(args.out, check=f"{args.check}: {rec.get('config', '?')}", device=args.device,
               dtype=args.dtype, status="ok", seconds=rec.get("wall_s"), note=note)
    return 0


def quant_check(args) -> int:
    """torchao's kernels on the device against the same pipeline unquantized: wall time of a
    batch at ``--steps`` (median of 2 after a warm-up) and PSNR; FP8 where the GPU has FP8 GEMMs."""
    import statistics
    import time

    import torch

    from sdinfer.eval.metrics import psnr
    from sdinfer.pipeline import Pipeline

    device = torch.device(args.device)
    pipe = Pipeline.from_pretrained(args.model, device=device, dtype=args.dtype)
    prompts = (PROMPTS * args.prompts)[:args.prompts]

    def timed():
        pipe(prompts, steps=2, seed=0)
        walls, out = [], None
        for _ in range(2):
            _sync(device)
            start = time.perf_counter()
            out = pipe(prompts, steps=args.steps, seed=0).pixels
            _sync(device)
            walls.append(time.perf_counter() - start)
        return statistics.median(walls), out

    base_s, base = timed()
    append(args.out, check=f"quant {args.model}: unquantized", device=str(device), dtype=args.dtype, status="ok",
           seconds=round(base_s, 3), note="reference")
    configs = ["Int8DynamicActivationInt8WeightConfig", "Int8WeightOnlyConfig"]
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        configs.append("Float8DynamicActivationFloat8WeightConfig")
    for name in configs:
        saved = {n: m.weight for n, m in pipe.model.denoiser.named_modules() if type(m) is torch.nn.Linear}
        try:
            import torchao.quantization as tq

            tq.quantize_(pipe.model.denoiser, getattr(tq, name)())
            seconds, out = timed()
            append(args.out, check=f"quant {args.model}: torchao {name}", device=str(device), dtype=args.dtype,
                   status="ok", seconds=round(seconds, 3),
                   note=f"speed-up {base_s / seconds:.2f}x, PSNR {psnr(out, base):.1f} dB vs unquantized")
        except Exception as err:  # noqa: BLE001 - a row says what failed
            append(args.out, check=f"quant {args.model}: torchao {name}", device=str(device), dtype=args.dtype,
                   status="FAIL", seconds=None, note=f"{type(err).__name__}: {str(err)[:200]}")
        finally:
            for n, weight in saved.items():
                pipe.model.denoiser.get_submodule(n).weight = weight
    return 0


def table(args) -> int:
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    print("| check | device | dtype | status | seconds | note |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        seconds = "" if r.get("seconds") is None else f"{r['seconds']:.3f}"
        print(f"| {r['check']} | {r['device']} | {r['dtype']} | {r['status']} | {seconds} | {r.get('note', '')} |")
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"\n{len(rows)} checks, {failed} failed")
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile")
    c.add_argument("--model", default="dit")
    c.add_argument("--cache", default=None)
    c.add_argument("--device", default="cuda")
    c.add_argument("--dtype", default="float16")
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no C compiler needed)")
    c.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    c.add_argument("--out", required=True)
    p = sub.add_parser("compare")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--check", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--min-psnr", type=float, default=35.0)
    p.add_argument("--out", required=True)
    b = sub.add_parser("bench-rows")
    b.add_argument("json")
    b.add_argument("--check", required=True)
    b.add_argument("--device", default="cuda")
    b.add_argument("--dtype", default="float16")
    b.add_argument("--out", required=True)
    q = sub.add_parser("quant")
    q.add_argument("--model", default="dit")
    q.add_argument("--device", default="cuda")
    q.add_argument("--dtype", default="bfloat16")
    q.add_argument("--steps", type=int, default=20)
    q.add_argument("--prompts", type=int, default=16)
    q.add_argument("--out", required=True)
    t = sub.add_parser("table")
    t.add_argument("results")
    args = ap.parse_args(argv)
    return {"compile": compile_check, "compare": compare, "bench-rows": bench_rows, "quant": quant_check,
            "table": table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
