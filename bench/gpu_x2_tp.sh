#!/usr/bin/env bash
# Issue 8 on nvidia-h200-x2: TP=2 exact against TP=1 in fp32, and the 8B decode step at TP=1/2
# with the collectives' share (bench/tp_decode.py). Results under $OUT.
set -o pipefail
source bench/device_env.sh || exit 1
timeout 400 python3 bench/tp_decode.py --check --check-archs llama qwen3 \
    --preset llama-3.1-8b --tp-sizes 1 2 --batch-sizes 1 64 --context 1024 --iters 30 \
    --checkpoint-dir /dev/shm/tp --out "$OUT/tp_h200x2.json" 2>&1 | grep -v "^\[" | tee "$OUT/tp_bench.log"
