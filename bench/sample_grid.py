"""Write a grid of default-model samples with their prompts (the README's picture).

    python bench/sample_grid.py --out docs/samples.png
"""

from __future__ import annotations

import argparse
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sdinfer.cli import _quiet_libraries  # noqa: E402
from sdinfer.eval.prompts import QUICK  # noqa: E402
from sdinfer.pipeline import Pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/samples.png")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _quiet_libraries()
    models = ["unet", "dit"]
    fig, axes = plt.subplots(len(models), len(QUICK), figsize=(2 * len(QUICK), 2.5 * len(models)))
    for row, name in enumerate(models):
        result = Pipeline.from_pretrained(name)(QUICK, steps=args.steps, guidance_scale=args.cfg,
                                                seed=args.seed)
        for col, (image, prompt) in enumerate(zip(result.images, QUICK)):
            ax = axes[row, col]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title("\n".join(textwrap.wrap(prompt, 22)), fontsize=7)
            if col == 0:
                ax.set_ylabel(name, fontsize=10)
    fig.suptitle(f"default models, DDIM {args.steps} steps, cfg {args.cfg:g}, seeds {args.seed}..")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
