#!/usr/bin/env bash
# Feature caches on the default models: each method and a sweep of its knob against the
# uncached run (DDIM 50 steps, guidance 4) over the 200 held-out prompts, batches of 50, two
# timed runs each (wall_s is their median), PSNR/SSIM against the uncached images, adherence,
# speedup_wall and speedup_macs (the compute bound: the speed-up if skipped work cost
# nothing and the rest cost what it does). Writes bench/results/caches-{unet,dit}.*
# Run on an otherwise idle machine: the speed-ups are wall-clock ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
common=(--prompts heldout --steps 50 --cfg 4 --batch 50 --repeats 2)
sdinfer bench --model unet "${common[@]}" \
  --accelerate deepcache:interval=2 --accelerate deepcache:interval=3 \
  --accelerate deepcache:interval=5 --accelerate deepcache:interval=3,branch=1 \
  --accelerate deepcache:interval=3,schedule=nonuniform \
  --json "$out/caches-unet.json" --plot "$out/caches-unet.png" > "$out/caches-unet.txt" 2>&1
sdinfer bench --model dit "${common[@]}" \
  --accelerate fora:interval=2 --accelerate fora:interval=3 --accelerate fora:interval=5 \
  --accelerate fbcache:threshold=0.05 --accelerate fbcache:threshold=0.08 \
  --accelerate fbcache:threshold=0.12 \
  --json "$out/caches-dit.json" --plot "$out/caches-dit.png" > "$out/caches-dit.txt" 2>&1
