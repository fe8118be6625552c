"""Each parallel strategy on 2 ranks against 1 device on this CPU.

    python bench/parallel.py                       # the full run: writes bench/results/parallel.{json,md}
    python bench/parallel.py --steps 6 --prompts 1 --repeats 1 --out /tmp/parallel   # a smoke run

A "device" here is one CPU core: the script starts 2 gloo ranks (``launch_local``), each with
one thread, and times the single-device run on rank 0 with one thread while rank 1 waits.
Per strategy and model (the default UNet at 64x64, the default DiT at 32x32, and both fine-tuned
at 64x64 at 64x64; ``--model`` picks one; DDIM, cfg 4, held-out prompts one at a time, the
latency of one request):

- latency: the median over ``--repeats`` generations of the prompts, and the speed-up over one
  device;
- bytes per step: what each rank sent (``Communicator.bytes_sent``), per model call, the larger
  of the two ranks;
- communication: the time a rank spent blocked in synchronous collectives per step (which
  also holds waiting for the slower rank), and for the collectives started in one place and
  waited for later (``Pending.wait``: DistriFusion's stale exchanges, PipeFusion's patch
  transfers, AsyncDiff's block outputs, ring attention's K/V shifts) the share that was hidden
  behind compute: 1 - (time blocked waiting for them) / t_comm, where t_comm is what the same
  calls and bytes take sent synchronously with nothing else running (an alpha-beta fit of gloo
  broadcasts on this machine, measured by the script: t = calls x alpha + bytes / beta);
- quality: PSNR of the images against the single-device images (100 dB when identical).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

RESULTS = Path(__file__).parent / "results"
CASES = {   # model: (size, strategies)
    "unet": (64, ["cfg", "distrifusion", "distrifusion:warmup_steps=1", "asyncdiff",
                  "asyncdiff:warmup_steps=5"]),
    "dit": (32, ["cfg", "ulysses", "ring", "pipefusion", "pipefusion:patches=4", "asyncdiff",
                 "asyncdiff:warmup_steps=5"]),
}
# the default models fine-tuned at 64x64, at their own size
CASES["unet-64"] = (64, CASES["unet"][1])
CASES["dit-64"] = (64, CASES["dit"][1])


STRIDE_2 = ["asyncdiff:stride=2", "asyncdiff:stride=2,warmup_steps=5"]
CASES_3 = {model: (size, STRIDE_2) for model, (size, _) in CASES.items()}   # on 3 ranks


def gloo_alpha_beta(comm) -> tuple[float, float]:
    """Seconds per collective and bytes per second of a 2-rank gloo broadcast, fitted on a
    small and a large message (median of 5 each)."""
    def timed(numel: int) -> float:
        x = torch.ones(numel)
        times = []
        for _ in range(5):
            dist.barrier()
            start = time.perf_counter()
            comm.start_broadcast(x, 0).wait()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    small, large = 16, 4 * 2**20
    t_small, t_large = timed(small), timed(large)
    beta = (large - small) * 4 / max(t_large - t_small, 1e-9)
    return t_small, beta


def generate(pipe, prompts, steps, size):
    out = []
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        out.append(pipe([prompt], steps=steps, sampler="ddim", guidance_scale=4.0, size=size, seeds=[i]).pixels)
    return torch.cat(out), time.perf_counter() - start


def rank_main(args) -> int:
    from sdinfer.eval.metrics import psnr
    from sdinfer.eval.prompts import load_prompts
    from sdinfer.parallel import Communicator, apply, launch
    from sdinfer.pipeline import Pipeline

    info = launch.init_process_group("gloo")
    torch.set_num_threads(1)
    prompts = load_prompts("heldout")[:args.prompts]
    comm = Communicator()
    alpha, beta = gloo_alpha_beta(comm)
    rows = []
    for model, (size, specs) in (CASES if args.world_size == 2 else CASES_3).items():
        if args.model and model not in args.model:
            continue
        pipe = Pipeline.from_pretrained(model)
        reference, times = None, []
        if info.rank == 0:
            generate(pipe, prompts[:1], 2, size)   # warm-up
            for _ in range(args.repeats):
                reference, seconds = generate(pipe, prompts, args.steps, size)
                times.append(seconds)
        dist.barrier()
        single = statistics.median(times) if times else None
        for spec in specs:
            handle = apply(pipe, spec)
            try:
                generate(pipe, prompts[:1], args.steps, size)   # warm-up (AsyncDiff counts its blocks' MACs)
                handle.comm.reset_counts()
                times = []
                for _ in range(args.repeats):
                    pixels, seconds = generate(pipe, prompts, args.steps, size)
                    times.append(seconds)
            finally:
                handle.remove()
            calls = args.repeats * len(prompts) * args.steps
            overlapped = handle.comm.overlapped
            mine = {"bytes": sum(handle.comm.bytes_sent.values()) / calls,
                    "blocked_s": (sum(handle.comm.blocked_s.values()) - overlapped["blocked_s"]) / calls,
                    "overlapped_bytes": overlapped["bytes"] / calls, "overlapped_calls": overlapped["calls"] / calls,
                    "overlapped_blocked_s": overlapped["blocked_s"] / calls}
            everyone = [None] * info.world_size
            dist.all_gather_object(everyone, mine)
            if info.rank == 0:
                latency = statistics.median(times) / len(prompts)
                t_comm = max(r["overlapped_calls"] * alpha + r["overlapped_bytes"] / beta for r in everyone)
                waited = max(r["overlapped_blocked_s"] for r in everyone)
                rows.append({
                    "model": model, "size": size, "strategy": spec,
                    "latency_s": round(latency, 3), "single_device_s": round(single / len(prompts), 3),
                    "speedup": round(single / len(prompts) / latency, 3),
                    "bytes_per_step": int(max(r["bytes"] for r in everyone)),
                    "sync_blocked_ms_per_step": round(max(r["blocked_s"] for r in everyone) * 1e3, 3),
                    "overlapped_bytes_per_step": int(max(r["overlapped_bytes"] for r in everyone)),
                    "overlapped_t_comm_ms_per_step": round(t_comm * 1e3, 3),
                    "overlapped_blocked_ms_per_step": round(waited * 1e3, 3),
                    "hidden_share": round(min(1.0, max(0.0, 1 - waited / t_comm)), 3) if t_comm > 0 else None,
                    "psnr": round(psnr(pixels, reference), 2),
                })
                print(f"{model} {spec}: {rows[-1]}", flush=True)
    if info.rank == 0:
        report = {"meta": {"date": datetime.date.today().isoformat(), "machine": platform.processor() or
                           platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "steps": args.steps, "prompts": len(prompts), "repeats": args.repeats,
                           "world_size": info.world_size,
                           "gloo_alpha_s": alpha, "gloo_beta_bytes_per_s": beta,
                           "command": "python bench/parallel.py " + " ".join(sys.argv[1:])},
                  "rows": rows}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        out.with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"{meta.get('world_size', 2)} gloo ranks (one thread each) against 1 device (one thread), DDIM {meta['steps']} steps, cfg 4, "
             f"{meta['prompts']} held-out prompts one at a time, median of {meta['repeats']}; gloo on this "
             f"machine: {meta['gloo_alpha_s'] * 1e6:.0f} us a collective, {meta['gloo_beta_bytes_per_s'] / 1e9:.2f} GB/s.",
             "", "| model | strategy | latency (s) | 1 device (s) | speed-up | bytes / step | sync blocked (ms / step) "
             "| overlapped bytes / step | their t_comm (ms / step) | hidden | PSNR vs 1 device |", "|" + "---|" * 11]
    for r in report["rows"]:
        hidden = "-" if r["hidden_share"] is None else f"{r['hidden_share']:.0%}"
        lines.append(f"| {r['model']} {r['size']}x{r['size']} | `{r['strategy']}` | {r['latency_s']:.3f} | "
                     f"{r['single_device_s']:.3f} | {r['speedup']:.2f}x | {r['bytes_per_step']:,} | "
                     f"{r['sync_blocked_ms_per_step']:.2f} | {r['overlapped_bytes_per_step']:,} | "
                     f"{r['overlapped_t_comm_ms_per_step']:.2f} | {hidden} | {r['psnr']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", choices=sorted(CASES), action="append", default=None,
                   help="the model(s) to run (default: all)")
    p.add_argument("--world-size", type=int, default=2,
                   help="ranks (default 2); 3 runs the strategies that need 3 (AsyncDiff stride 2), "
                        "oversubscribing a 2-core CPU: their latency is then not a speed-up")
    p.add_argument("--out", default=str(RESULTS / "parallel"))
    p.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from sdinfer.parallel import launch

    if args.rank:
        return launch.run_rank(lambda: rank_main(args))
    codes = launch.launch_local([sys.executable, __file__, "--rank", *(argv or sys.argv[1:])], args.world_size)
    return launch.exit_code(codes)


if __name__ == "__main__":
    sys.exit(main())
