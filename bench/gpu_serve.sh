#!/usr/bin/env bash
# Serving throughput on one GPU, colocated (router + one worker that prefills and decodes),
# qwen3-0.6b shape, random weights, bf16: 500 random 512-token prompts, 128 output tokens,
# rate inf (issue 7's serving target; vLLM's published figure on an H100 is 94.9 req/s).
# Also the offline engine on the same workload in the same run, as the engine's own ceiling.
# Run on the device machine from the repo root, with the wheels of .whl/ (see bench/README.md).
set -uo pipefail
source bench/device_env.sh || exit 1  # wheels, this checkout, $OUT, $OUT/gpus.txt
[ -f /tmp/qwen3/config.json ] || python3 -m splitserve.cli model init /tmp/qwen3 --arch qwen3 --preset qwen3-0.6b --device cuda
# MODES: the worker's --async-scheduling for each serving run, in turn (default: "auto off",
# async scheduling against the synchronous engine in the same call); the offline engine runs
# with each mode too (OFFLINE=0: not). Records go under $OUT/serve-<mode>, packed into
# $OUT/serve${TAG:+-$TAG}.tgz. SAMPLING: bench serve's sampling flags (default greedy), e.g.
# SAMPLING="--temperature 1.0 --top-p 0.95".
serve() {
mode=$1
python3 -m splitserve.cli router --model /tmp/qwen3 --port 50051 --http-port 0 --metrics-port -1 \
    --max-tokens-limit 4096 > "$OUT/router-$mode.log" 2>&1 &
sleep 8
python3 -m splitserve.cli decode --model /tmp/qwen3 --device cuda --port 50071 --metrics-port -1 \
    --worker-id decode-0 --control-plane grpc://127.0.0.1:50051 --async-scheduling $mode \
    --max-num-seqs 256 --max-num-batched-tokens 8192 > "$OUT/decode-$mode.log" 2>&1 &
for i in $(seq 120); do grep -q "listening on" "$OUT/decode-$mode.log" && break; sleep 1; done
grep "listening on" "$OUT/decode-$mode.log" || { tail -30 "$OUT/decode-$mode.log"; return 1; }
# ROUTERS=N: N routers of one platform (the others use the first one's store as their control
# plane), and the bench client sends requests to them in turn.
TARGETS=127.0.0.1:50051
for r in $(seq 2 ${ROUTERS:-1}); do
    port=$((50050 + r))
    python3 -m splitserve.cli router --model /tmp/qwen3 --port $port --http-port -1 --metrics-port -1 \
        --max-tokens-limit 4096 --control-plane grpc://127.0.0.1:50051 > "$OUT/router$r-$mode.log" 2>&1 &
    TARGETS=$TARGETS,127.0.0.1:$port
done
sleep $(( ${ROUTERS:-1} > 1 ? 8 : 0 ))
# PROFILE=1: py-spy samples the router, the worker and the bench client during the run
# (collapsed stacks under $OUT/profile-<mode>, for flame graphs; py-spy comes with the carried wheels).
CLIENT=
if [ "${PROFILE:-0}" = 1 ]; then
    mkdir -p "$OUT/profile-$mode"; SPY=/tmp/site/bin/py-spy
    for name in router decode; do
        pid=$(pgrep -f "splitserve.cli $name" | head -1)
        $SPY record --pid "$pid" --duration 20 --rate 200 --format raw --threads -o "$OUT/profile-$mode/$name.txt" \
            > "$OUT/profile-$mode/$name.log" 2>&1 &
    done
    CLIENT="$SPY record --rate 200 --format raw --threads -o $OUT/profile-$mode/client.txt --"
fi
$CLIENT python3 -m splitserve.cli bench serve --target $TARGETS --dataset random --num-prompts 500 \
    --input-len 512 --output-len 128 --request-rate inf --seed 0 --num-warmups 8 --disable-tqdm \
    ${SAMPLING:-} --out "$OUT/serve-$mode" --label qwen3-0.6b-colocated-async-$mode${TAG:+-$TAG} 2>&1 | tee "$OUT/serve-$mode.log" | tail -45
pkill -f "splitserve.cli (router|decode)"; sleep 3
[ "${OFFLINE:-1}" = 1 ] || return 0
python3 bench/offline_throughput.py --model /tmp/qwen3 --device cuda --dtype bfloat16 --batch-size 256 \
    --num-prompts 500 --input-len 512 --output-len 128 --async-scheduling $mode \
    --out "$OUT/offline-$mode.json" 2>&1 | tail -12 | tee "$OUT/offline-$mode.log"
}
for mode in ${MODES:-auto off}; do serve $mode; done
grep -h "Request throughput\|Output token throughput\|Mean TPOT\|label" "$OUT"/serve-*.log
grep -H "requests/s" "$OUT"/offline-*.log 2>/dev/null
# The device tool returns only a few files per call: pack the run's records and logs into one.
(cd "$OUT" && tar czf serve${TAG:+-$TAG}.tgz serve-*/ serve-*.log $(ls offline-*.log 2>/dev/null) router*.log decode-*.log $(ls -d profile-* 2>/dev/null) \
    && rm -rf serve-*/ serve-*.log offline-*.log router*.log decode-*.log profile-*)
