"""ParaDiGMS and ParaTAA on a default model: 100-step DDIM with guidance, in parallel.

For each setting: sequential model rounds (the latency in units of one step), total step
evaluations (the compute), wall time on this CPU and the final image's max abs error
against sequential DDIM from the same noise (pixels in [-1, 1]).

    python bench/parallel_sampling.py --model dit --prompts 2
"""

from __future__ import annotations

import argparse
import time

import torch

from sdinfer.eval.prompts import load_prompts
from sdinfer.pipeline import Pipeline
from sdinfer.samplers import DDIM, sample_loop
from sdinfer.samplers.paradigms import paradigms
from sdinfer.samplers.parataa import parataa

STEPS = 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dit")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--tolerances", default="0.1,0.03,0.01")
    ap.add_argument("--windows", default="20,100")
    ap.add_argument("--memories", default="1,2,3")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.model)
    prompts = load_prompts("heldout")[: args.prompts]
    cond, uncond = pipe.encode(prompts), pipe.encode([""] * len(prompts))
    x_T = pipe.noise(list(range(len(prompts))), pipe.check_size(None))
    den = pipe.denoiser(args.cfg)

    t0 = time.perf_counter()
    with torch.no_grad():
        seq = sample_loop(den, DDIM(), x_T.clone(), STEPS, cond, uncond, spacing="trailing")
    seq_wall = time.perf_counter() - t0

    print(f"model {args.model}, {len(prompts)} prompts, cfg {args.cfg:g}, {STEPS}-step DDIM, "
          f"torch threads {torch.get_num_threads()}")
    print()
    print("| method | window / memory | tolerance | rounds | evaluations | wall s | "
          "max abs error vs sequential |")
    print("|---|---|---|---|---|---|---|")
    print(f"| sequential DDIM | - | - | {STEPS} | {STEPS} | {seq_wall:.1f} | 0 |")
    tolerances = [float(v) for v in args.tolerances.split(",")]
    runs = [("ParaDiGMS", f"window {w}", tol,
             lambda tol=tol, w=w: paradigms(den, x_T.clone(), STEPS, cond, uncond, window=w, tolerance=tol))
            for w in map(int, filter(None, args.windows.split(","))) for tol in tolerances]
    runs += [("ParaTAA", f"memory {m}", tol,
              lambda tol=tol, m=m: parataa(den, x_T.clone(), STEPS, cond, uncond, tolerance=tol, memory=m))
             for m in map(int, filter(None, args.memories.split(","))) for tol in tolerances]
    for name, knob, tol, run in runs:
        t0 = time.perf_counter()
        res = run()
        wall = time.perf_counter() - t0
        err = float((res.x - seq).abs().max())
        print(f"| {name} | {knob} | {tol:g} | {res.rounds} | {res.evaluations} | {wall:.1f} | "
              f"{err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
