#!/usr/bin/env bash
# Extend the shipped DiT's training on the lent GPU machine (device tool), in one call:
#   bash bench/device_finetune_dit.sh          (carry .whl: the diffusers wheel)
# It fine-tunes from the shipped `dit` weights at a large batch for about MINUTES minutes
# (bench/timed_train.py measures the speed and prints the plain `sdinfer train-default`
# command it runs), then packs the exported model and the checkpoint into $OUT.
# Settings: MINUTES, BATCH, LR, WORKERS, DEVICE, RUN_DIR (environment).
set -u
MINUTES=${MINUTES:-7.2}
BATCH=${BATCH:-1024}
LR=${LR:-1e-3}
WORKERS=${WORKERS:-13}
DEVICE=${DEVICE:-cuda}
RUN_DIR=${RUN_DIR:-runs/dit-gpu}
OUT=${OUT:-runs/device-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src
fi
export PYTHONUNBUFFERED=1 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
nvidia-smi -L 2>/dev/null
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
python3 bench/timed_train.py --arch dit --minutes "$MINUTES" --batch-size "$BATCH" --lr "$LR" \
    --init-from dit --run-dir "$RUN_DIR" --device "$DEVICE" --data-workers "$WORKERS" 2>&1 | tee "$OUT/train.log"
if [ ! -d "$RUN_DIR/model" ] && [ -f "$RUN_DIR/checkpoint.json" ]; then
    echo "the run stopped before its last step: exporting its EMA weights from the checkpoint"
    python3 - "$RUN_DIR" <<'EOF'
import json, sys
from pathlib import Path
from sdinfer.models.default.export import export_pipeline
from sdinfer.models.default.train import TrainConfig, Trainer
run = Path(sys.argv[1])
cfg = TrainConfig(**json.loads((run / "checkpoint.json").read_text())["config"])
trainer = Trainer(cfg, run)
trainer.try_resume()
export_pipeline(trainer, run / "model")
print("exported step", trainer.step)
EOF
fi
cp "$RUN_DIR/checkpoint.json" "$OUT/" 2>/dev/null
tar czf "$OUT/model.tgz" -C "$RUN_DIR" model 2>/dev/null
[ -f "$RUN_DIR/checkpoint.safetensors" ] && split -b 15m -d "$RUN_DIR/checkpoint.safetensors" "$OUT/checkpoint.safetensors.part"
ls -la "$OUT"
