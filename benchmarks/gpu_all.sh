#!/bin/sh
# The whole GPU check in one device call of about 8 minutes (timeout_s 540 leaves a margin):
#   1. benchmarks.gpu_check: v2 parity with diffusers on CUDA (fp32), the bf16 error, and the peak
#      memory of Stage C's step per activation checkpointing mode (at most 150 s);
#   2. benchmarks.memory_plan: the v2 memory plan against the peak of two real training steps
#      (batch 32, full checkpointing; at most 150 s);
#   3. benchmarks.gpu_train: the training matrix, one JSON line per row, stopping itself in time.
# Results land in $OUT (gpu_check.json, memory_plan.jsonl, gpu_train.jsonl). Prepare here with benchmarks/gpu_wheels.sh
# and carry .whl. benchmarks.gpu_ray_train (the real job under Ray) needs Ray and MLflow there too.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
timeout 150 python3 -m benchmarks.gpu_check --device cuda --flavor v2 --json "$OUT/gpu_check.json"
timeout 150 python3 -m benchmarks.memory_plan --device cuda --flavor v2 --batch 32 --checkpointing full --json "$OUT/memory_plan.jsonl"
left=$((460 - ($(date +%s) - start)))
python3 -m benchmarks.gpu_train --deadline-s "$left" --jsonl "$OUT/gpu_train.jsonl"
echo "gpu_all: $(($(date +%s) - start)) s"
