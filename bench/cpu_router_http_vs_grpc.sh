#!/usr/bin/env bash
# The router's own CPU time per output token, gRPC against the OpenAI HTTP door, on the CPU:
# one router and one colocated decode worker on loopback, the same bench serve workload through
# --backend grpc and --backend openai-completions in turn (ROUNDS times), the router process's
# user+system CPU seconds read from /proc around each run. On a shared or small machine the
# engine, not the router, sets the throughput, so the router's CPU per token is what compares
# the two doors; throughput columns are printed but say little here.
#   bash bench/cpu_router_http_vs_grpc.sh MODEL_DIR [NUM_PROMPTS INPUT_LEN OUTPUT_LEN ROUNDS]
set -uo pipefail
MODEL=${1:?checkpoint directory}; N=${2:-300}; IN=${3:-128}; OUT_LEN=${4:-64}; ROUNDS=${5:-2}
LOGS=${OUT:-$(mktemp -d)}; mkdir -p "$LOGS"
python3 -m splitserve.cli router --model "$MODEL" --port 50151 --http-port 50181 --metrics-port -1 \
    --max-tokens-limit 4096 > "$LOGS/router.log" 2>&1 &
ROUTER=$!
for i in $(seq 120); do grep -q "listening on" "$LOGS/router.log" && break; sleep 1; done
python3 -m splitserve.cli decode --model "$MODEL" --device cpu --port 50171 --metrics-port -1 --worker-id decode-0 \
    --control-plane grpc://127.0.0.1:50151 --max-num-seqs 256 > "$LOGS/decode.log" 2>&1 &
DECODE=$!
trap 'kill $ROUTER $DECODE 2>/dev/null' EXIT
for i in $(seq 180); do grep -q "listening on" "$LOGS/decode.log" && break; sleep 1; done
cpu() { awk '{print $14 + $15}' /proc/$ROUTER/stat; }  # clock ticks
TICKS=$(getconf CLK_TCK)
echo "backend round router_cpu_s us_per_token req_per_s events_per_request" > "$LOGS/table.txt"
for round in $(seq "$ROUNDS"); do
    for backend in grpc openai-completions; do
        target=127.0.0.1:50151; [ $backend = grpc ] || target=127.0.0.1:50181
        before=$(cpu)
        python3 -m splitserve.cli bench serve --backend $backend --target $target --num-prompts "$N" --input-len "$IN" \
            --output-len "$OUT_LEN" --request-rate inf --seed 0 --disable-tqdm --no-plots --out "$LOGS" \
            --label $backend-$round > "$LOGS/$backend-$round.log" 2>&1
        after=$(cpu)
        python3 - "$LOGS/$backend-$round.json" $(( after - before )) "$TICKS" $backend $round >> "$LOGS/table.txt" <<'EOF'
import json, sys
path, ticks, per_s, backend, rnd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
point = json.load(open(path))["points"][0]
m, ok = point["metrics"], [r for r in point["records"] if r["error_code"] is None]
seconds = ticks / per_s
events = sum(len(r["chunk_times"]) for r in ok) / max(len(ok), 1)
print(backend, rnd, f"{seconds:.2f}", f"{1e6 * seconds / max(m['total_output_tokens'], 1):.0f}", f"{m['request_throughput']:.2f}", f"{events:.1f}")
EOF
    done
done
column -t "$LOGS/table.txt"
echo "logs: $LOGS"
