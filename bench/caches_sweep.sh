#!/usr/bin/env bash
# Every cache method on both default models, each with a sweep of its knob (the methods of
# bench/caches.sh excepted: DeepCache and FORA / First-Block Cache are swept there on 200 prompts):
# DDIM 50 steps, guidance 4, 32 held-out prompts in one batch, two timed runs each (wall_s is their
# median), PSNR / SSIM against the uncached images, adherence, speedup_wall and speedup_macs
# (the compute bound). Writes bench/results/caches-sweep-{unet,dit}.{json,txt,png}
# Run on an otherwise idle machine (about 30 minutes on 2 cores): the speed-ups are wall-clock ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
common=(--prompts heldout --limit 32 --batch 32 --steps 50 --cfg 4 --repeats 2)
sdinfer bench --model unet "${common[@]}" \
  --accelerate deepcache:interval=3 --accelerate deepcache:interval=3,layer=0 \
  --accelerate taylorseer:interval=3,order=2 --accelerate taylorseer:interval=4,warmup=0 \
  --accelerate teacache:threshold=0.1 --accelerate teacache:threshold=0.15 --accelerate teacache:threshold=0.2 \
  --accelerate magcache --accelerate magcache:threshold=0.12,max_skip_steps=2,retention=0.1 \
  --accelerate l2c:budget=0.2 --accelerate l2c:budget=0.35 --accelerate l2c:budget=0.5 \
  --accelerate blockcache:threshold=0.04 --accelerate blockcache:threshold=0.05 \
  --accelerate blockcache:threshold=0.07 \
  --accelerate tgate:gate=0.4 --accelerate tgate --accelerate tgate:gate=0.8 \
  --json "$out/caches-sweep-unet.json" --plot "$out/caches-sweep-unet.png" > "$out/caches-sweep-unet.txt" 2>&1
sdinfer bench --model dit "${common[@]}" \
  --accelerate fora:interval=3 \
  --accelerate dbcache:threshold=0.08,taylorseer=true --accelerate dbcache:threshold=0.12,taylorseer=true,order=2 \
  --accelerate dbcache:threshold=0.2,taylorseer=true \
  --accelerate taylorseer:interval=3,order=2 --accelerate taylorseer:interval=4,warmup=0 \
  --accelerate taylorseer:interval=5 \
  --accelerate teacache:threshold=0.1 --accelerate teacache:threshold=0.15 --accelerate teacache:threshold=0.2 \
  --accelerate magcache --accelerate magcache:threshold=0.24,max_skip_steps=2,retention=0.1 \
  --accelerate blockcache:threshold=0.04 --accelerate blockcache:threshold=0.05 \
  --accelerate blockcache:threshold=0.07 \
  --accelerate l2c:budget=0.2 --accelerate l2c:budget=0.35 --accelerate l2c:budget=0.65 \
  --accelerate tgate --accelerate tgate:gate=0.6 --accelerate tgate:gate=0.8 \
  --json "$out/caches-sweep-dit.json" --plot "$out/caches-sweep-dit.png" > "$out/caches-sweep-dit.txt" 2>&1
