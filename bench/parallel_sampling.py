"""ParaDiGMS against ParaTAA on a default model: rounds (batched model calls, the latency)
to reach a given distance from sequential 100-step DDIM, with guidance.

    python bench/parallel_sampling.py --model unet --prompts 2

For each method and tolerance: rounds, step evaluations, and the largest pixel
difference (images in [0, 1]) between its image and the sequential one.
"""

from __future__ import annotations

import argparse

import torch

from sdinfer.models.default import shapes
from sdinfer.pipeline import Pipeline
from sdinfer.samplers import DDIM, sample_loop
from sdinfer.samplers.parallel import paradigms
from sdinfer.samplers.parataa import parataa

STEPS = 100
TOLERANCES = (0.1, 0.03, 0.01, 0.003)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="unet")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--cfg", type=float, default=4.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    pipe = Pipeline.from_pretrained(args.model)
    prompts = shapes.heldout_prompts()[:args.prompts]
    cond, uncond = pipe.encode(prompts), pipe.encode([""] * len(prompts))
    x_T = pipe.noise(list(range(len(prompts))), pipe.check_size(None))
    den = pipe.denoiser(args.cfg)
    with torch.no_grad():
        seq = pipe.decode(sample_loop(den, DDIM(), x_T.clone(), STEPS, cond, uncond))
    print(f"model {args.model}, {len(prompts)} prompts, DDIM {STEPS} steps, cfg {args.cfg}\n")
    print("| method | tolerance | rounds | evaluations | max pixel error vs sequential |")
    print("|---|---|---|---|---|")
    runs = [("ParaDiGMS window 100", lambda tol: paradigms(den, x_T.clone(), STEPS, cond, uncond,
                                                           window=STEPS, tolerance=tol))]
    runs += [(f"ParaTAA memory {m}", lambda tol, m=m: parataa(den, x_T.clone(), STEPS, cond, uncond,
                                                             tolerance=tol, memory=m))
             for m in (1, 2, 3)]
    for name, run in runs:
        for tol in TOLERANCES:
            res = run(tol)
            err = float((pipe.decode(res.x) - seq).abs().max())
            print(f"| {name} | {tol} | {res.rounds} | {res.evaluations} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
