#!/usr/bin/env bash
# A short check of sdinfer on a lent GPU machine, printing one table (issue 19, section 2):
# generate on cuda in float16 and bfloat16 (both default models), bench with one cache per
# family, CFG parallel on two ranks (one GPU each where there are two, else both on the one
# GPU over gloo), and torch.compile on the denoiser with a cache installed (does it compile,
# does it recompile every step, by torch._dynamo's counters; how fast against eager).
#
# Usage, from the repository root:
#   bash bench/gpu_check.sh WHEELS [OUT]
# WHEELS: a folder of wheels for pip's --find-links holding sdinfer's dependencies other than
#   torch (the lent machine has torch but not diffusers, and no network). Make it beforehand on
#   a machine with network, for the lent machine's Python, e.g.
#     pip download --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
#         -d wheels "diffusers==0.42.*" "transformers==5.*" tokenizers safetensors torchmetrics tqdm pillow numpy
#   (leave torch out: the machine's CUDA build stays), and carry it in the tree. "-": install
#   nothing (the dependencies are there already).
# OUT: where images, bench JSON and results.jsonl go (default: out/gpu_check).
#
# DEVICE=cpu bash bench/gpu_check.sh - out/gpu_check-cpu
#   runs every piece on the CPU at a tiny setting (2 steps, 2 prompts, bfloat16 only,
#   torch.compile with the aot_eager backend): a check of the script itself where no GPU is lent.
# Knobs (environment): DEVICE (cuda), DTYPES ("float16 bfloat16"), STEPS (20), PROMPTS (16),
#   COMPILE_BACKEND (inductor), PYTHON (python).
# Needs the CLI's --device / --dtype on generate and bench.
set -u
WHEELS=${1:?usage: bash bench/gpu_check.sh WHEELS_DIR|- [OUT_DIR]}
OUT=${2:-out/gpu_check}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python}
if [ "$DEVICE" = cpu ]; then
    DTYPES=${DTYPES:-bfloat16}; STEPS=${STEPS:-2}; PROMPTS=${PROMPTS:-2}; COMPILE_BACKEND=${COMPILE_BACKEND:-aot_eager}
else
    DTYPES=${DTYPES:-float16 bfloat16}; STEPS=${STEPS:-20}; PROMPTS=${PROMPTS:-16}; COMPILE_BACKEND=${COMPILE_BACKEND:-inductor}
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
LOG="$OUT/log.txt"
: > "$LOG"

if [ "$WHEELS" != - ]; then
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" \
        "diffusers>=0.32" "transformers>=4.46" "tokenizers>=0.20" "safetensors>=0.4" \
        numpy pillow tqdm torchmetrics >>"$LOG" 2>&1 || { echo "pip install from $WHEELS failed: see $LOG"; exit 1; }
fi
"$PYTHON" - <<'EOF' | tee -a "$LOG"
import torch
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, GPUs {torch.cuda.device_count()}",
      *(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
EOF

# one row: CHECK DTYPE STATUS SECONDS NOTE
row() {
    "$PYTHON" - "$RESULTS" "$1" "$DEVICE" "$2" "$3" "$4" "$5" <<'EOF'
import json, sys
out, check, device, dtype, status, seconds, note = sys.argv[1:]
with open(out, "a") as f:
    f.write(json.dumps({"check": check, "device": device, "dtype": dtype, "status": status,
                        "seconds": float(seconds) if seconds else None, "note": note}) + "\n")
EOF
}

# timed CHECK DTYPE -- COMMAND...: one row with the command's wall time (start-up included)
timed() {
    local check=$1 dtype=$2; shift 3
    echo "== $check ($dtype): $*" >>"$LOG"
    local start=$EPOCHREALTIME status=ok note="wall time, start-up and loading included"
    "$@" >>"$LOG" 2>&1 || { status=FAIL; note="$(tail -n 3 "$LOG" | tr '\n|' '  ' | tail -c 240)"; }
    row "$check" "$dtype" "$status" "$(awk "BEGIN {print $EPOCHREALTIME - $start}")" "$note"
}

SDI=("$PYTHON" -m sdinfer)
PROMPT="a red circle in the top left"

# 1. generate, both default models, each dtype
for dtype in $DTYPES; do
    for model in unet dit; do
        timed "generate $model" "$dtype" -- "${SDI[@]}" generate "$PROMPT" --model "$model" --steps "$STEPS" \
            --device "$DEVICE" --dtype "$dtype" --quiet --overwrite -o "$OUT/generate-$model-$dtype.png"
    done
done

# 2. bench in the first dtype: one cache per family (schedule, first block, whole stack,
#    per layer, forecast, attention gate)
DTYPE1=${DTYPES%% *}
bench() {
    local model=$1; shift
    timed "bench $model" "$DTYPE1" -- "${SDI[@]}" bench --model "$model" --steps "$STEPS" --prompts heldout \
        --limit "$PROMPTS" --batch "$PROMPTS" --repeats 2 --device "$DEVICE" --dtype "$DTYPE1" \
        --json "$OUT/bench-$model.json" "$@"
    [ -f "$OUT/bench-$model.json" ] && "$PYTHON" bench/gpu_check.py bench-rows "$OUT/bench-$model.json" \
        --check "bench $model" --device "$DEVICE" --dtype "$DTYPE1" --out "$RESULTS"
}
bench unet --accelerate deepcache:interval=3 --accelerate teacache --accelerate blockcache --accelerate tgate
bench dit --accelerate fora:interval=3 --accelerate fbcache --accelerate magcache --accelerate taylorseer

# 3. CFG parallel on two ranks against one device (same seed, same settings)
timed "cfg parallel, 2 ranks" "$DTYPE1" -- "${SDI[@]}" generate "$PROMPT" --model dit --steps "$STEPS" \
    --device "$DEVICE" --dtype "$DTYPE1" --parallel cfg --world-size 2 --quiet --overwrite -o "$OUT/cfg2-dit.png"
if [ -f "$OUT/cfg2-dit.png" ] && [ -f "$OUT/generate-dit-$DTYPE1.png" ]; then
    "$PYTHON" bench/gpu_check.py compare "$OUT/generate-dit-$DTYPE1.png" "$OUT/cfg2-dit.png" \
        --check "cfg parallel = one device" --device "$DEVICE" --dtype "$DTYPE1" --out "$RESULTS"
fi

# 4. torch.compile on the denoiser with a cache installed (and without, for the speed-up alone)
for spec in "unet deepcache:interval=3" "dit fora:interval=3" "dit fbcache" "dit -"; do
    set -- $spec
    cache=(--cache "$2"); [ "$2" = - ] && cache=()
    echo "== compile $1 $2" >>"$LOG"
    before=$(wc -l < "$RESULTS")
    "$PYTHON" bench/gpu_check.py compile --model "$1" "${cache[@]}" --device "$DEVICE" --dtype "$DTYPE1" \
        --steps "$STEPS" --backend "$COMPILE_BACKEND" --repeats 2 --out "$RESULTS" >>"$LOG" 2>&1
    [ "$(wc -l < "$RESULTS")" -gt "$before" ] \
        || row "compile $1 + $2" "$DTYPE1" FAIL "" "$(tail -n 2 "$LOG" | tr '\n|' '  ' | tail -c 240)"
done

# 5. quantization kernels (issue 22): torchao's int8 configs and, on Hopper / Ada, its FP8 one (the GEMMs
#    our int8 / FP8 formats would run on), and a quantized folder of ours loaded on the device
#    (simulated: dequantize then matmul). Needs torchao in WHEELS (or installed).
if [ "$WHEELS" != - ]; then
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" "torchao>=0.18" >>"$LOG" 2>&1 \
        || echo "torchao not in $WHEELS: the kernel rows will say so" >>"$LOG"
fi
echo "== quant kernels" >>"$LOG"
before=$(wc -l < "$RESULTS")
"$PYTHON" bench/gpu_check.py quant --model dit --device "$DEVICE" --dtype "$DTYPE1" --steps "$STEPS" \
    --prompts "$PROMPTS" --out "$RESULTS" >>"$LOG" 2>&1
[ "$(wc -l < "$RESULTS")" -gt "$before" ] \
    || row "quant kernels" "$DTYPE1" FAIL "" "$(tail -n 2 "$LOG" | tr '\n|' '  ' | tail -c 240)"
timed "quantize dit rtn int8" "$DTYPE1" -- "${SDI[@]}" quantize --model dit --method rtn:weights=int8 \
    --overwrite --out "$OUT/dit-rtn-int8"
timed "generate quantized dit" "$DTYPE1" -- "${SDI[@]}" generate "$PROMPT" --model "$OUT/dit-rtn-int8" \
    --steps "$STEPS" --device "$DEVICE" --dtype "$DTYPE1" --quiet --overwrite -o "$OUT/generate-dit-rtn-int8.png"

echo
"$PYTHON" bench/gpu_check.py table "$RESULTS" | tee "$OUT/table.md"
