#!/usr/bin/env bash
# Train the bundled vlmux/shapes captioner on one GPU, then judge it on 500 fresh pictures on the GPU and on
# two CPU cores. Run from the repository root; writes to $OUT (default ./device-out):
#   shapes.tar          the model folder: tar -xf shapes.tar -C src/vlmux/models   (-> src/vlmux/models/shapes)
#   train.log           everything the training printed
#   train_curve.json    settings, losses and held-out exact match over time, best step
#   eval.txt            accuracy and speed on 500 fresh pictures (GPU float32, then CPU on 2 cores)
# Stays under 9.5 minutes: 6.5 min of training, about 30 s around it, then two evaluations of at most 100 s.
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
# A smoke run elsewhere (keeps the packaged folder untouched):
#   MODEL=/tmp/smoke/shapes DEVICE=cpu MINUTES=0.3 WORKERS=1 BATCH=4 HELD_OUT=20 COUNT=20 bash tools/device_train_shapes.sh
DEVICE=${DEVICE:-cuda} MINUTES=${MINUTES:-6.5} WORKERS=${WORKERS:-14} BATCH=${BATCH:-128}
HELD_OUT=${HELD_OUT:-400} COUNT=${COUNT:-500}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
MODEL=${MODEL:-src/vlmux/models/shapes}
start=$SECONDS
echo "$(nproc) cores"; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
python3 -c "import torch, transformers, torchvision; print('torch', torch.__version__, 'transformers', transformers.__version__)"

timeout 480 python3 tools/train_shapes.py --device "$DEVICE" --batch "$BATCH" --workers "$WORKERS" \
    --minutes "$MINUTES" --lr 2e-3 --warmup 300 --eval-every 200 --eval-count "$HELD_OUT" --replay 1 --target 1.0 \
    --out "$MODEL" --log "$OUT/train_curve.json" 2>&1 | tee "$OUT/train.log" \
    | grep --line-buffered -E "parameters|held-out|Error|error|Traceback|^step [0-9]*000 "
echo "training exited after $((SECONDS - start)) s"

if [ -f "$MODEL/config.json" ]; then
    tar -cf "$OUT/shapes.tar" -C "$(dirname "$MODEL")" "$(basename "$MODEL")"
    ls -l "$MODEL" "$OUT/shapes.tar"
    {
        timeout 100 python3 tools/eval_shapes.py --model "$MODEL" --device "$DEVICE" --dtype float32 --batch-size 100 \
            --count "$COUNT"
        OMP_NUM_THREADS=2 timeout 100 taskset -c 0,1 python3 tools/eval_shapes.py --model "$MODEL" --device cpu --batch-size 32 \
            --count "$COUNT"
    } 2>&1 | grep -v -i warn | tee "$OUT/eval.txt"
else
    echo "no model was saved"
fi
echo "total $((SECONDS - start)) s"
