#!/usr/bin/env bash
# The foundation issue's figures: held-out adherence of both default models (DDIM 50 steps,
# guidance 4; one timed run, the two models side by side on one core each), the bench
# harness against itself on the quick set (3 timed runs), and generate's wall time.
# Writes bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
for model in unet dit; do
  OMP_NUM_THREADS=1 sdinfer bench --model "$model" --prompts heldout --steps 50 --cfg 4 \
    --batch 100 --repeats 1 --json "$out/heldout-$model.json" > "$out/heldout-$model.txt" 2>&1 &
done
wait
for model in unet dit; do
  sdinfer bench --model "$model" --prompts quick --steps 50 --cfg 4 --repeats 3 \
    --json "$out/self-$model.json" --plot "$out/self-$model.png" > "$out/self-$model.txt" 2>&1
done
: > "$out/generate.txt"
for i in 1 2 3; do
  /usr/bin/time -f "generate wall %e s" sdinfer generate "a red circle in the top left" \
    -o "$out/generate.png" --overwrite --quiet >> "$out/generate.txt" 2>&1
done
