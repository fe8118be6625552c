"""A rank of the stale strategies' quality test, started by ``sdinfer.parallel.launch.launch_local``.

``python parallel_worker_quality.py OUT``: the default models fine-tuned at 64x64 at 64x64,
DDIM 50 steps, cfg 4, two held-out prompts; each stale strategy with its paper's default warm-up
(DistriFusion and AsyncDiff on the UNet, PipeFusion and AsyncDiff on the DiT) against one device.
Rank 0 writes the PSNR of each prompt's image to OUT (JSON) for ``test_parallel_quality.py``.
"""

from __future__ import annotations

import sys

from sdinfer.eval.metrics import psnr
from sdinfer.eval.prompts import load_prompts
from sdinfer.parallel import launch
from parallel_helpers import under, write_findings

CASES = {"unet-64": ["distrifusion", "asyncdiff"], "dit-64": ["pipefusion", "asyncdiff"]}
STEPS = 50


def main(out_path: str) -> int:
    from sdinfer.pipeline import Pipeline

    launch.init_process_group("gloo")
    prompts = load_prompts("heldout")[:2]

    def run(pipe):
        return pipe(prompts, steps=STEPS, sampler="ddim", guidance_scale=4.0, size=64, seeds=[0, 1]).pixels

    found: dict = {}
    for model, strategies in CASES.items():
        pipe = Pipeline.from_pretrained(model)
        reference = run(pipe)
        for spec in strategies:
            pixels, _ = under(pipe, spec, lambda: run(pipe))
            found[f"{model} {spec}"] = [psnr(pixels[i:i + 1], reference[i:i + 1]) for i in range(len(prompts))]
    write_findings(found, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(launch.run_rank(lambda: main(sys.argv[1])))
