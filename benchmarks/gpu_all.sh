#!/bin/sh
# The whole GPU check in one device call of about 8 minutes (TOTAL seconds, 500 by default; timeout_s
# 560 leaves a margin). The parts, most telling first, each bounded so that the next still runs:
#   1. benchmarks.gpu_check: v2 parity with diffusers on CUDA (fp32), the bf16 error, and the peak
#      memory of Stage C's step per activation checkpointing mode (at most 120 s);
#   2. benchmarks.gpu_train: the training matrix, one JSON line per row, stopping itself before its
#      deadline (what is left once 280 s are kept for the next two parts);
#   3. benchmarks.gpu_ray_train: the real training job under Ray (a local cluster on this node) against
#      the bare loop on the same settings (at most 200 s);
#   4. benchmarks.memory_plan: the v2 memory plan against the peak of two real training steps (batch 32,
#      full checkpointing; what is left, at most 120 s).
# Results land in $OUT (gpu.txt, gpu_check.json, gpu_train.jsonl, gpu_ray_train.jsonl, memory_plan.jsonl).
# Prepare here with `sh benchmarks/gpu_wheels.sh` (.whl/site.tar.xz: pydantic, diffusers, Ray, MLflow
# for CPython 3.12) and carry .whl.
set -u
OUT=${OUT:-/tmp/gpu_check}
TOTAL=${TOTAL:-500}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
start=$(date +%s)
if [ -f .whl/site.tar.xz ]; then
    mkdir -p /tmp/site
    if command -v xz > /dev/null; then
        xz -dc -T0 .whl/site.tar.xz | tar -C /tmp/site -xf - || exit 1
    else
        python3 -c "import tarfile; tarfile.open('.whl/site.tar.xz').extractall('/tmp/site', filter='tar')" || exit 1
    fi
fi
# The project is not installed there: the repository root on the path of this process and of Ray's workers.
export PYTHONPATH=/tmp/site:$(pwd)${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
left() { echo $((TOTAL - ($(date +%s) - start) - $1)); }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
echo "gpu_all: unpacked in $(($(date +%s) - start)) s"
timeout 120 python3 -m benchmarks.gpu_check --device cuda --flavor v2 --json "$OUT/gpu_check.json"
python3 -m benchmarks.gpu_train --deadline-s "$(left 280)" --jsonl "$OUT/gpu_train.jsonl"
timeout 200 python3 -m benchmarks.gpu_ray_train --jsonl "$OUT/gpu_ray_train.jsonl"
plan=$(left 0)
[ "$plan" -gt 120 ] && plan=120
[ "$plan" -gt 20 ] && timeout "$plan" python3 -m benchmarks.memory_plan --device cuda --flavor v2 --batch 32 \
    --checkpointing full --json "$OUT/memory_plan.jsonl"
echo "gpu_all: $(($(date +%s) - start)) s"
