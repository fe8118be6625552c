#!/usr/bin/env bash
# Caching peers side by side with sdinfer's caches on both default models (bench/peers.py):
# DeepCache and T-GATE on the UNet, diffusers' cache hooks, cache-dit and para-attn on the DiT,
# each beside our counterpart spec; 48 held-out prompts, DDIM 50 steps, cfg 4, batches of 16,
# one timed run per row. Writes bench/results/peers-{unet,dit}.{json,md}. About 20 minutes on
# 2 cores: run it on an otherwise idle machine (the speed-ups are wall-clock ratios).
# The peers go into the venv without their dependencies (the library's own are all they use here):
#   pip install --no-deps DeepCache==0.1.1 tgate==1.0.0 cache-dit==1.5.3 para-attn==0.3.38
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/peers.py --prompts heldout --limit 48 --steps 50 --cfg 4 --batch 16 --repeats 1 "$@" \
  2>&1 | tee bench/results/peers.txt
