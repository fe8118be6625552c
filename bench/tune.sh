#!/usr/bin/env bash
# sdinfer tune on both default models, then the separate held-out check of each preset:
#   1. sdinfer tune --model M --budget adherence-drop=0.02 (128 validation prompts, never the held-out
#      ones) -> bench/results/tune-M/{preset,front}.json, front.png
#   2. sdinfer bench on the 200 held-out prompts: the preset against 50-step DDIM (cfg 4), interleaved
#      -> bench/results/tune-M.json (the acceptance: >= 10x wall, adherence within 2 points)
#   3. the search against the exhaustive grid on a small space (bench/tune_vs_exhaustive.py)
#      -> bench/results/tune-vs-exhaustive-unet.json
# Expected time on 2 idle cores (estimated from a trial on a busy machine: the UNet's tune at 64
# validation prompts took 6 CPU-minutes on one thread): tune ~6 min (unet) and ~8 min (dit), each
# held-out check ~4-6 min (200 prompts at 50 steps for the baseline, a warm-up and two timed runs),
# the small-space comparison ~9 min: about 35-40 minutes in all.
# Run it on an otherwise idle machine (wall-clock ratios).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "expected: about 35-40 minutes on 2 idle cores (tune ~6-8 min per model, held-out checks ~4-6 min each, comparison ~9 min)"
for M in unet dit; do
  start=$SECONDS
  sdinfer tune --model "$M" --budget adherence-drop=0.02 --validation 128 --cfg 4 --out "bench/results/tune-$M" \
    2>&1 | tee "bench/results/tune-$M.txt"
  echo "tune $M: $((SECONDS - start)) s" | tee -a "bench/results/tune-$M.txt"
  sdinfer bench --model "$M" --prompts heldout --baseline ddim:50 --preset "bench/results/tune-$M/preset.json" \
    --steps 50 --cfg 4 --batch 50 --repeats 2 --json "bench/results/tune-$M.json" \
    2>&1 | tee -a "bench/results/tune-$M.txt"
done
python bench/tune_vs_exhaustive.py --model unet --budget adherence-drop=0.02 --validation 32 --repeats 2 \
  --json bench/results/tune-vs-exhaustive-unet.json 2>&1 | tee bench/results/tune-vs-exhaustive-unet.txt
