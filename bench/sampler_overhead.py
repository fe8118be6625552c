"""Per-step sampler overhead against one forward of the default models.

    python bench/sampler_overhead.py [--threads 2]

Overhead is everything a step costs except the model: the denoiser's guidance and
prediction conversion, the schedule lookups and the solver's update.  It is measured by
running each sampler with a stand-in model that returns a precomputed output (so the
loop does all its work but no network), on the pipeline's default shape (one 3x32x32
image, guidance on, so the model sees a batch of 2), and set against the median time of
one real forward of each default model on the same batch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sdinfer.denoiser import Denoiser
from sdinfer.models.calling import call_denoiser
from sdinfer.pipeline import Pipeline
from sdinfer.samplers import get_sampler, sample_loop

SAMPLERS = ["ddim", "ddpm", "dpm-solver++", "dpm-solver++-3m", "dpm-solver++-2s",
            "dpm-solver++-sde", "unipc", "euler", "heun", "plms", "sampler-scheduler"]
STEPS = 50


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    forwards = {}
    pipes = {name: Pipeline.from_pretrained(name) for name in ("unet", "dit")}
    for name, pipe in pipes.items():
        cond, uncond = pipe.encode(["a red circle in the top left"]), pipe.encode([""])
        from sdinfer.models.calling import concat_text
        text = concat_text(cond, uncond)
        x = torch.randn(2, 3, 32, 32)
        t = torch.full((2,), 500.0)
        net = pipe.model.denoiser
        with torch.no_grad():
            forwards[name] = median_seconds(lambda: call_denoiser(net, x, t, text), args.repeats * 5)
    pipe = pipes["unet"]
    cond, uncond = pipe.encode(["a red circle in the top left"]), pipe.encode([""])
    canned = torch.randn(2, 3, 32, 32)
    print(f"one forward at batch 2: unet {forwards['unet'] * 1e3:.2f} ms, dit {forwards['dit'] * 1e3:.2f} ms "
          f"({args.threads} threads)")
    print("| sampler | overhead per step (ms) | % of a UNet forward | % of a DiT forward |")
    print("|---|---|---|---|")
    for spec in SAMPLERS:
        solver = get_sampler(spec)
        den = Denoiser(lambda x, t, text: canned, pipe.model.schedule, pipe.model.prediction_type, 4.0)
        x_T = torch.randn(1, 3, 32, 32)
        seconds = median_seconds(lambda: sample_loop(den, solver, x_T, STEPS, cond, uncond,
                                                     generator=torch.Generator().manual_seed(0)),
                                 args.repeats)
        evaluations = den.nfe / (args.repeats + 1)
        per_step = seconds / evaluations  # per model evaluation, so two-evaluation steps count twice
        print(f"| {spec} | {per_step * 1e3:.3f} | {100 * per_step / forwards['unet']:.2f}% | "
              f"{100 * per_step / forwards['dit']:.2f}% |")


if __name__ == "__main__":
    main()
