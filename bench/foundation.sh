#!/usr/bin/env bash
# The foundation issue's figures: held-out adherence of both default models (DDIM 50 steps,
# guidance), the bench harness against itself, and generate's wall time. Writes bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
cfg=${CFG:-4}
for model in unet dit; do
  sdinfer bench --model "$model" --prompts heldout --steps 50 --cfg "$cfg" --batch 50 --repeats 3 \
    --json "$out/heldout-$model.json" --plot "$out/heldout-$model.png" | tee "$out/heldout-$model.txt"
done
for i in 1 2 3; do
  /usr/bin/time -f "generate wall %e s" sdinfer generate "a red circle in the top left" \
    -o "$out/generate.png" --overwrite --quiet 2>&1 | tee -a "$out/generate.txt"
done
