#!/usr/bin/env bash
# Pareto fronts of the caching peers against sdinfer's caches on both default models
# (bench/fronts.py): each peer's knob swept (DeepCache, T-GATE on the UNet; diffusers'
# FirstBlockCache / TaylorSeer / MagCache / PAB and cache-dit's DBCache on the DiT) and each of our
# caches swept on the same model, in the same loop, all timed together (interleaved) against one
# uncached run: the first 16 held-out prompts in one batch, DDIM 50 steps, cfg 4, two timed runs
# per configuration. Writes bench/results/fronts-{unet,dit}.{json,png} and bench/results/fronts.txt;
# then `python bench/report.py` rebuilds BENCHMARKS.md's `fronts` table.
# About 25 minutes on 2 idle cores (unet ~10, dit ~16; estimated, not yet timed idle): run it on an otherwise idle machine (wall-clock ratios).
# The peers go into the venv without their dependencies:
#   pip install --no-deps DeepCache==0.1.1 tgate==1.0.0 cache-dit==1.5.3
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/fronts.py --model both --prompts heldout --limit 16 --steps 50 --cfg 4 --repeats 2 "$@" \
  2>&1 | tee bench/results/fronts.txt
