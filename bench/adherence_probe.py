"""Per-attribute adherence (kind, colour, position, all three) on the first N held-out prompts.

    python bench/adherence_probe.py MODEL N STEPS CFGS [THREADS]
    python bench/adherence_probe.py dit 60 50 3,4,6,8,12 1

DDIM, seeds 0..N-1, batches of 20; the checker is sdinfer.eval.adherence.
"""

from __future__ import annotations

import collections
import sys

import torch

from sdinfer.eval.adherence import detect, parse_caption
from sdinfer.models.default import shapes
from sdinfer.models.loading import load_model
from sdinfer.pipeline import Pipeline


def main() -> None:
    model, n, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cfgs = [float(c) for c in sys.argv[4].split(",")]
    torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 2)
    pipe = Pipeline(load_model(model))
    prompts = shapes.heldout_prompts()[:n]
    for cfg in cfgs:
        right = collections.Counter()
        for i in range(0, n, 20):
            batch = prompts[i:i + 20]
            result = pipe(batch, steps=steps, guidance_scale=cfg, seeds=list(range(i, i + len(batch))))
            for img, prompt in zip(result.pixels, batch):
                d = detect((img.permute(1, 2, 0).numpy() * 255).round())
                f = parse_caption(prompt)
                right["kind"] += d.kind == f.kind
                right["colour"] += d.colour == f.colour
                right["position"] += d.position == f.position
                right["all"] += (d.kind, d.colour, d.position) == (f.kind, f.colour, f.position)
        print(model, f"cfg={cfg:g}", {k: round(v / n, 3) for k, v in right.items()}, flush=True)


if __name__ == "__main__":
    main()
