#!/usr/bin/env bash
# The GPU speed targets of the training and sampling issues, in one run (~10 min on one H100, random weights):
#   training:  >= 40% MFU for the full 256 px step (PixCell-XL, bf16)
#   sampling:  >= 25 images/s at 256 px, a 4096 px region in <= 60 s, batched 4K >= 2x the one-window reference
#   few steps: the distilled student's shape at 4 LCM steps (256 / 1024 px images/s, 4096 px region seconds)
# Each benchmark prints its rows as it goes; everything is also written to $OUT (default benchmarks/results/gpu).
#
#   bash benchmarks/gpu_targets.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
run() {  # name, then the benchmark's arguments
    local name=$1
    shift
    echo "== $name: $*"
    "$PY" -m "$@" 2>&1 | grep -v "should be kept in float32" | tee "$OUT/$name.txt"
}
run optim benchmarks.bench_optim --preset PixCell-XL/2-256 --device cuda
run train_256_ckpt benchmarks.bench_train --preset PixCell-XL/2-256 --batch 64 --dtype bf16 --grad-ckpt
run train_256_ckpt_compile benchmarks.bench_train --preset PixCell-XL/2-256 --batch 64 --dtype bf16 --grad-ckpt --compile
run train_256_compile benchmarks.bench_train --preset PixCell-XL/2-256 --batch 96 --dtype bf16 --compile
run train_1024_ckpt benchmarks.bench_train --preset PixCell-XL/2-1024 --batch 8 --dtype bf16 --grad-ckpt
run sample benchmarks.bench_sample --preset PixCell-XL/2-256 PixCell-XL/2-1024 --device cuda --dtype bf16
run sample_compile benchmarks.bench_sample --preset PixCell-XL/2-1024 --device cuda --dtype bf16 --compile
run sample_student benchmarks.bench_sample --preset PixCell-XL/2-256 PixCell-XL/2-1024 --device cuda --dtype bf16 --student --steps 4
run sample_student_compile benchmarks.bench_sample --preset PixCell-XL/2-256 PixCell-XL/2-1024 --device cuda --dtype bf16 --student --steps 4 --compile
