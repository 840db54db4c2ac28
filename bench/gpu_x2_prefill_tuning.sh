#!/usr/bin/env bash
# Issue 12 on nvidia-h200-x2, prefill-heavy workload (2-4k-token prompts, 128 out), llama-3.1-8b
# shape, TP=1: disaggregated (1 prefill + 1 decode) and colocated at the default chunked-prefill
# budget (8192 tokens a step), then colocated at a smaller budget (BUDGET2, default 2048: shorter
# decode stalls behind each prefill chunk, the tuning the first run pointed at). Also, first, the
# TP teardown test on the same two GPUs (issue 8). Everything comes back in one archive.
set -o pipefail
source bench/device_env.sh || exit 1
NCCL_DEBUG=WARN timeout 90 python3 -m pytest -q -p no:cacheprovider tests/parallel/test_tp_gpu_teardown.py \
    > "$OUT/teardown_test.log" 2>&1
echo "== teardown test: exit $?"; tail -2 "$OUT/teardown_test.log"
MODEL=/dev/shm/llama8b
[ -f $MODEL/config.json ] || python3 -m splitserve.cli model init $MODEL --arch llama --preset llama-3.1-8b \
    --device cuda --overwrite > "$OUT/model_init.log" 2>&1 || { tail -5 "$OUT/model_init.log"; exit 1; }
RATES=${RATES:-8,10,12}
bench() {  # out dir, setups, chunked-prefill budget, seconds
    timeout $(($4 + 40)) python3 bench/disagg.py --model $MODEL --devices cuda:0 cuda:1 --setups $2 \
        --workloads prefill_heavy --rates prefill_heavy=$RATES \
        --worker-args "--max-num-seqs 256 --max-num-batched-tokens $3 --max-model-len 8192" \
        --budget-s $4 --out "$OUT/$1" 2>&1 | grep -v "^\s*$" | tee "$OUT/$1.log" | grep "req/s\|up in\|Error"
}
bench b8192 "disagg coloc" 8192 230
bench coloc_b${BUDGET2:-2048} coloc ${BUDGET2:-2048} 120
(cd "$OUT" && tar czf prefill_tuning.tgz b8192* coloc_b* teardown_test.log gpus.txt && rm -rf b8192* coloc_b*)
