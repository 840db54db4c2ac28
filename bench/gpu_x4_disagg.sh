#!/usr/bin/env bash
# Issue 10 on nvidia-h200-x4: llama-3.1-8b shape (random bf16 weights written here), one setup
# per call, each over the same four GPUs, then packed into one archive under $OUT:
#   bash bench/gpu_x4_disagg.sh p2d2     prefill TP=2 + decode TP=2
#   bash bench/gpu_x4_disagg.sh p2d1x2   prefill TP=2 + two decode workers at TP=1
#   bash bench/gpu_x4_disagg.sh coloc    two colocated engines at TP=2
#   bash bench/gpu_x4_disagg.sh kv       KV transfer GPU to GPU against a torch copy, same run
set -o pipefail
source bench/device_env.sh || exit 1
MODEL=/dev/shm/llama8b
[ -f $MODEL/config.json ] || python3 -m splitserve.cli model init $MODEL --arch llama --preset llama-3.1-8b \
    --device cuda --overwrite > "$OUT/model_init.log" 2>&1 || { tail -5 "$OUT/model_init.log"; exit 1; }
DEVICES="cuda:0 cuda:1 cuda:2 cuda:3"
ARGS="--max-num-seqs 256 --max-num-batched-tokens ${BUDGET:-8192} --max-model-len 8192"
case "$1" in
    p2d2)   SETUP=(--setups disagg --prefill-tp 2 --decode-tp 2) ;;
    p2d1x2) SETUP=(--setups disagg --prefill-tp 2 --decode 2 --decode-tp 1) ;;
    coloc)  SETUP=(--setups coloc --prefill-tp 2 --decode-tp 2 --coloc-tp 2) ;;
    kv)     timeout 300 python3 bench/kv_transfer.py --device cuda --blocks 64,256 --block-sizes 16,32 \
                --out "$OUT/kv_transfer_x4.json" 2>&1 | grep -v "^\[" | tee "$OUT/kv_transfer_x4.log"; exit ;;
    *)      echo "usage: $0 p2d2|p2d1x2|coloc|kv"; exit 2 ;;
esac
timeout ${BENCH_TIMEOUT:-520} python3 bench/disagg.py --model $MODEL --devices $DEVICES "${SETUP[@]}" \
    --workloads prefill_2k decode_heavy --worker-args "$ARGS" --budget-s ${BUDGET_S:-430} \
    --out "$OUT/$1" 2>&1 | tee "$OUT/disagg_$1.log"
(cd "$OUT" && tar czf "$1.tgz" "$1" && rm -rf "$1")
