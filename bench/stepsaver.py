"""StepSaver on a default model: label training captions with their fewest DDIM steps,
fit the predictor, ship it beside the model, and measure it on the held-out prompts.

    python bench/stepsaver.py --model unet [--ship]

Labels: the fewest of 5, 6, 8, 10, 12, 15, 20, 25, 30, 40 steps whose image is within
--threshold dB PSNR of the 50-step image from the same seed (cfg 4), on 150 training-grammar
captions (none of them held out).  Evaluation: for each of the 200 held-out prompts the
predicted count, the image at that count against the 50-step reference (PSNR, adherence),
and the mean steps saved; next to it the oracle (the labels themselves on the held-out set).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sdinfer.cli import _quiet_libraries
from sdinfer.eval.adherence import adherence_rate
from sdinfer.eval.metrics import psnr
from sdinfer.models.default import shapes
from sdinfer.models.loading import DEFAULT_MODELS
from sdinfer.pipeline import Pipeline
from sdinfer.models import artifacts
from sdinfer.stepsaver import CANDIDATES, KIND, StepPredictor, find_min_steps, prompt_features


def to_uint8(pixels):
    return [(p.permute(1, 2, 0).numpy() * 255).round() for p in pixels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="unet")
    parser.add_argument("--threshold", type=float, default=30.0)
    parser.add_argument("--train", type=int, default=150)
    parser.add_argument("--ship", action="store_true", help="write the predictor beside the shipped model")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    _quiet_libraries()
    pipe = Pipeline.from_pretrained(args.model)
    train = list(dict.fromkeys(s.caption for s in shapes.sample_specs(args.train * 2, 777,
                                                                        set(shapes.heldout_prompts()))))[:args.train]
    labels = find_min_steps(pipe, train, reference_steps=50, candidates=CANDIDATES,
                            threshold_db=args.threshold, seed=10_000)
    predictor = StepPredictor.fit(prompt_features(pipe, train), labels.steps, list(CANDIDATES) + [50])
    heldout = shapes.heldout_prompts()
    predicted = predictor.predict(prompt_features(pipe, heldout))
    oracle = find_min_steps(pipe, heldout, reference_steps=50, candidates=CANDIDATES,
                            threshold_db=args.threshold, seed=0)
    seeds = list(range(len(heldout)))
    reference = torch.cat([pipe(heldout[i:i + 50], steps=50, seeds=seeds[i:i + 50]).pixels
                           for i in range(0, len(heldout), 50)])
    images = torch.empty_like(reference)
    for n in sorted(set(predicted)):
        idx = [i for i, s in enumerate(predicted) if s == n]
        for k in range(0, len(idx), 50):
            part = idx[k:k + 50]
            images[part] = pipe([heldout[i] for i in part], steps=n, seeds=[seeds[i] for i in part]).pixels
    result = {
        "model": args.model, "threshold_db": args.threshold, "train_prompts": len(train),
        "train_mean_steps": labels.mean_steps,
        "heldout_predicted_mean_steps": sum(predicted) / len(predicted),
        "heldout_oracle_mean_steps": oracle.mean_steps,
        "heldout_steps_saved": 1 - sum(predicted) / len(predicted) / 50,
        "heldout_psnr_db_vs_50": psnr(images, reference),
        "heldout_share_within_threshold": sum(
            psnr(a[None], b[None]) >= args.threshold for a, b in zip(images, reference)) / len(heldout),
        "adherence_50_steps": adherence_rate(to_uint8(reference), heldout),
        "adherence_auto_steps": adherence_rate(to_uint8(images), heldout),
        "predicted_histogram": {str(n): predicted.count(n) for n in sorted(set(predicted))},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.ship:
        shipped = artifacts.path(DEFAULT_MODELS[args.model], KIND)
        predictor.save(shipped)
        print(f"wrote {shipped}")


if __name__ == "__main__":
    main()
