#!/usr/bin/env bash
# Issue 12 on nvidia-h200-x2: 1 prefill + 1 decode worker against 2 colocated engines, llama-3.1-8b
# shape (random bf16 weights written here), TP=1. One setup per call: bash bench/gpu_x2_disagg.sh disagg|coloc
set -o pipefail
source bench/device_env.sh || exit 1
MODEL=/dev/shm/llama8b
[ -f $MODEL/config.json ] || python3 -m splitserve.cli model init $MODEL --arch llama --preset llama-3.1-8b \
    --device cuda --overwrite > "$OUT/model_init.log" 2>&1 || { tail -5 "$OUT/model_init.log"; exit 1; }
timeout ${BENCH_TIMEOUT:-520} python3 bench/disagg.py --model $MODEL --devices cuda:0 cuda:1 --setups "$1" \
    --worker-args "--max-num-seqs 256 --max-num-batched-tokens ${BUDGET:-8192} --max-model-len 8192" \
    --budget-s ${BUDGET_S:-430} --out "$OUT/disagg" ${@:2} 2>&1 | tee "$OUT/disagg.log"
# The device tool returns only a few files per call: pack the run into one.
(cd "$OUT" && tar czf disagg.tgz disagg && rm -rf disagg)
