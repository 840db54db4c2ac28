#!/usr/bin/env bash
# Disaggregation on ONE GPU, in one device call (nvidia-h200, ~8 minutes):
#   bw     the same-GPU KV hand-off (CUDA IPC) against a same-GPU copy, 64 MiB - 1 GiB of
#          llama-3-8b-shaped blocks (2 MiB each); NIXL/UCX on the same GPU at 64 MiB for reference
#   serve  `splitserve up --device cuda` (prefill + decode on the GPU, KV memory split) against
#          `up --mode colocated` (one worker), qwen3-0.6b shape (random bf16 weights): 500 x 512/128
#          at rate inf, then a prefill-heavy sweep (2-4k-token prompts, 128 out) with goodput at
#          TTFT <= 500 ms and TPOT <= 25 ms, ITL p99 beside it; transfer timeouts counted in the logs
# A short table comes last; records and logs are packed into $OUT/one_gpu.tgz.
#   bash bench/gpu_one_gpu_disagg.sh            (PHASES="bw serve" by default; SWEEP=0 skips the sweep)
set -o pipefail
source bench/device_env.sh || exit 1
mkdir -p "$OUT/one_gpu"
R=$OUT/one_gpu
WORKER="--max-num-seqs 256 --max-num-batched-tokens 8192"

if [[ " ${PHASES:-bw serve} " == *" bw "* ]]; then
    python3 bench/kv_transfer.py --device cuda --blocks 32,128,512 --layouts block_major --ops READ --iters 20 --warmup 3 \
        --out "$R/kv_cuda_ipc.json" 2>&1 | grep -v NIXL | tee "$R/kv_cuda_ipc.log"
    python3 bench/kv_transfer.py --device cuda --blocks 32 --layouts block_major --ops READ --iters 3 --warmup 1 --cuda-ipc off \
        --out "$R/kv_nixl.json" 2>&1 | grep -v NIXL | tee "$R/kv_nixl.log"
fi

run_layout() {  # $1: label, the rest: up's layout flags
    label=$1; shift
    python3 -m splitserve.cli up --model /tmp/qwen3 --device cuda --port 50051 --http-port -1 --log-level INFO $WORKER "$@" \
        > "$R/up-$label.log" 2>&1 &
    for i in $(seq 240); do grep -q "splitserve router listening" "$R/up-$label.log" && break; sleep 1; done
    grep "splitserve router listening" "$R/up-$label.log" || { tail -30 "$R/up-$label.log"; return 1; }
    python3 -m splitserve.cli bench serve --target 127.0.0.1:50051 --num-prompts 500 --input-len 512 --output-len 128 \
        --request-rate inf --seed 0 --num-warmups 8 --disable-tqdm --no-plots --out "$R" --label "serve-$label" 2>&1 \
        | tee "$R/serve-$label.log" | grep -E "Request throughput|Mean TPOT|P99 ITL"
    if [ "${SWEEP:-1}" = 1 ]; then
        python3 -m splitserve.cli bench serve --target 127.0.0.1:50051 --num-prompts 200 --input-len 3000 --range-ratio 0.33 \
            --output-len 128 --request-rate 8,16,32,64 --seed 0 --num-warmups 4 --disable-tqdm --no-plots \
            --goodput ttft:500 tpot:25 --out "$R" --label "sweep-$label" > "$R/sweep-$label.log" 2>&1
    fi
    pkill -INT -f "splitserve.cli up"; for i in $(seq 60); do pgrep -f "splitserve.cli (up|router|prefill|decode)" > /dev/null || break; sleep 1; done
    pkill -9 -f "splitserve.cli (up|router|prefill|decode)"; sleep 2
}

if [[ " ${PHASES:-bw serve} " == *" serve "* ]]; then
    [ -f /tmp/qwen3/config.json ] || python3 -m splitserve.cli model init /tmp/qwen3 --arch qwen3 --preset qwen3-0.6b --device cuda \
        > "$R/model_init.log" 2>&1 || { tail -5 "$R/model_init.log"; exit 1; }
    run_layout disagg-1gpu
    run_layout colocated --mode colocated
fi

python3 - "$R" <<'EOF'
import glob, json, os, sys
r = sys.argv[1]
print("\n== one GPU: KV hand-off (READ, block_major, 2 MiB blocks) ==")
print(f"{'path':<9}{'MiB':>7}{'GB/s':>9}{'copy GB/s':>11}{'ratio':>7}")
for name in ("kv_cuda_ipc.json", "kv_nixl.json"):
    if os.path.exists(f"{r}/{name}"):
        for row in json.load(open(f"{r}/{name}"))["rows"]:
            print(f"{row['path']:<9}{row['num_bytes'] / 2**20:>7.0f}{row['gbps']:>9.2f}{row['ceiling_gbps']:>11.2f}{row['ratio']:>7.2f}")
print("\n== one GPU: serving (qwen3-0.6b shape) ==")
print(f"{'setup':<14}{'workload':<22}{'rate':>6}{'req/s':>8}{'goodput':>9}{'TTFT p50':>9}{'TPOT p50':>9}{'ITL p99':>8}{'timeouts':>9}")
for label in ("disagg-1gpu", "colocated"):
    log = f"{r}/up-{label}.log"
    timeouts = open(log).read().count("did not finish within") if os.path.exists(log) else -1
    for kind, workload in (("serve", "500 x 512/128"), ("sweep", "2-4k/128, SLO 500/25")):
        path = f"{r}/{kind}-{label}.json"
        if not os.path.exists(path):
            continue
        for point in json.load(open(path))["points"]:
            m = point["metrics"]
            f = lambda key, digits=1: "-" if m.get(key) is None else f"{m[key]:.{digits}f}"
            print(f"{label:<14}{workload:<22}{str(point['request_rate']):>6}{m['request_throughput']:>8.2f}{f('request_goodput', 2):>9}"
                  f"{f('median_ttft_ms'):>9}{f('median_tpot_ms', 2):>9}{f('p99_itl_ms'):>8}{timeouts:>9}")
EOF
# The device tool returns only a few files per call: pack the records and logs into one.
(cd "$OUT" && tar czf one_gpu.tgz one_gpu && rm -rf one_gpu)
