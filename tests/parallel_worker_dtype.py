"""A rank of the bfloat16 parallel test: exact strategies on the default models in bfloat16 on
gloo, each against the same bfloat16 pipeline on one device; rank 0 writes the PSNRs to OUT."""

from __future__ import annotations

import sys

import torch

from sdinfer.eval.metrics import psnr
from sdinfer.parallel import launch
from parallel_helpers import under, write_findings

PROMPT = "a red circle in the top left"
CASES = (("dit", "cfg"), ("dit", "ulysses"), ("unet", "cfg"))


def main(out_path: str) -> int:
    from sdinfer.pipeline import Pipeline

    launch.init_process_group(device="cpu")   # the backend follows the device: gloo
    found: dict = {"backend": torch.distributed.get_backend()}
    pipes = {m: Pipeline.from_pretrained(m, dtype="bfloat16") for m in ("dit", "unet")}
    for model, spec in CASES:
        pipe = pipes[model]
        reference = pipe([PROMPT], steps=3).pixels
        pixels, _ = under(pipe, spec, lambda: pipe([PROMPT], steps=3).pixels)
        found[f"{model}/{spec}"] = {"psnr": psnr(pixels, reference), "dtype": str(pixels.dtype)}
    write_findings(found, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(launch.run_rank(lambda: main(sys.argv[1])))
