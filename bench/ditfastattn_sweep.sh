#!/usr/bin/env bash
# DiTFastAttn's threshold swept on the default DiT beside two caches, in one interleaved run (one
# baseline): DDIM 50 steps, guidance 4, the first 32 held-out prompts in one batch, two timed runs
# each, as bench/caches_sweep.sh. Writes bench/results/ditfastattn-sweep-dit.{json,txt,png}.
# Run on an otherwise idle machine (about 5 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
sdinfer bench --model dit --prompts heldout --limit 32 --batch 32 --steps 50 --cfg 4 --repeats 2 \
  --accelerate ditfastattn:threshold=0.025 --accelerate ditfastattn:threshold=0.05 \
  --accelerate ditfastattn:threshold=0.1 --accelerate fora:interval=3 --accelerate teacache:threshold=0.15 \
  --json "$out/ditfastattn-sweep-dit.json" --plot "$out/ditfastattn-sweep-dit.png" \
  > "$out/ditfastattn-sweep-dit.txt" 2>&1
