#!/usr/bin/env bash
# Every cache method on both default models, quality and compute bound only: DDIM 50 steps,
# guidance 4, 16 held-out prompts, PSNR / SSIM against the uncached images and speedup_macs
# (the speed-up if skipped work cost nothing). Deterministic, so it may run on a busy
# machine; its wall-clock columns are then meaningless (bench/caches.sh times them).
# Writes bench/results/caches-quality-{unet,dit}.{json,txt}
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
common=(--prompts heldout --limit 16 --batch 16 --steps 50 --cfg 4 --repeats 1)
sdinfer bench --model unet "${common[@]}" \
  --accelerate deepcache:interval=3 --accelerate deepcache:interval=3,layer=0 \
  --accelerate taylorseer:interval=3,order=2 --accelerate taylorseer:interval=4,warmup=0 \
  --accelerate tgate --accelerate teacache --accelerate magcache \
  --accelerate blockcache \
  --json "$out/caches-quality-unet.json" > "$out/caches-quality-unet.txt" 2>&1
sdinfer bench --model dit "${common[@]}" \
  --accelerate fora:interval=3 --accelerate fbcache:threshold=0.12 \
  --accelerate dbcache:threshold=0.12,taylorseer=true,order=2 --accelerate dbcache:threshold=0.2,taylorseer=true \
  --accelerate taylorseer:interval=3,order=2 --accelerate taylorseer:interval=5 \
  --accelerate tgate --accelerate teacache --accelerate magcache \
  --accelerate blockcache \
  --json "$out/caches-quality-dit.json" > "$out/caches-quality-dit.txt" 2>&1
