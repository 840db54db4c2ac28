#!/usr/bin/env bash
# The OpenAI HTTP door against gRPC on one GPU: one server (router + one colocated decode worker,
# qwen3-0.6b shape, random bf16 weights, the full-vocabulary tokenizer so every sampled id is
# text), one workload (500 random 512-token prompts, 128 output tokens, rate inf), measured by
# `bench serve --backend grpc`, `--backend openai-completions`, `--backend openai-chat`, and by
# an independent client (bench/openai_sdk_client.py: the openai package over httpx). gRPC and
# openai-completions run twice, interleaved, to show the run-to-run spread. Table printed last.
# Run on the device machine from the repo root with the wheels of .whl/ (bench/fetch_device_wheels.sh).
# PROFILE=1: py-spy samples the router during the first HTTP run ($OUT/profile-router-http.txt).
set -uo pipefail
source bench/device_env.sh || exit 1  # wheels, this checkout, $OUT, $OUT/gpus.txt
MODEL=/tmp/qwen3-fullvocab  # not /tmp/qwen3: gpu_serve.sh's model there may have the old 1,024-token tokenizer
[ -f $MODEL/config.json ] || python3 -m splitserve.cli model init $MODEL --arch qwen3 --preset qwen3-0.6b --device cuda \
    > "$OUT/model-init.log" 2>&1 || { tail -5 "$OUT/model-init.log"; exit 1; }
python3 -m splitserve.cli router --model $MODEL --port 50051 --http-port 8000 --metrics-port -1 \
    --max-tokens-limit 4096 > "$OUT/router.log" 2>&1 &
for i in $(seq 60); do grep -q "listening on" "$OUT/router.log" && break; sleep 1; done
python3 -m splitserve.cli decode --model $MODEL --device cuda --port 50071 --metrics-port -1 \
    --worker-id decode-0 --control-plane grpc://127.0.0.1:50051 --async-scheduling auto \
    --max-num-seqs 256 --max-num-batched-tokens 8192 > "$OUT/decode.log" 2>&1 &
for i in $(seq 180); do grep -q "listening on" "$OUT/decode.log" && break; sleep 1; done
grep "listening on" "$OUT/decode.log" || { tail -30 "$OUT/decode.log" "$OUT/router.log"; exit 1; }
WORKLOAD="--dataset random --num-prompts 500 --input-len 512 --output-len 128 --request-rate inf --seed 0 --disable-tqdm --no-plots"
bench() {  # bench LABEL BACKEND TARGET [extra...]
    label=$1 backend=$2 target=$3; shift 3
    timeout 300 python3 -m splitserve.cli bench serve --backend $backend --target $target $WORKLOAD --num-warmups 8 \
        --out "$OUT/runs" --label $label "$@" > "$OUT/$label.log" 2>&1
    tail -22 "$OUT/$label.log"
}
bench grpc-1 grpc 127.0.0.1:50051
if [ "${PROFILE:-0}" = 1 ]; then
    /tmp/site/bin/py-spy record --pid "$(pgrep -f 'splitserve.cli router' | head -1)" --duration 25 --rate 200 --format raw \
        -o "$OUT/profile-router-http.txt" > "$OUT/profile.log" 2>&1 &
fi
bench http-completions-1 openai-completions 127.0.0.1:8000
bench http-chat openai-chat 127.0.0.1:8000 --tokenizer $MODEL
timeout 300 python3 bench/openai_sdk_client.py --base-url http://127.0.0.1:8000/v1 --num-prompts 500 --input-len 512 \
    --output-len 128 --out "$OUT/runs/openai-sdk.json" > "$OUT/openai-sdk.log" 2>&1; tail -12 "$OUT/openai-sdk.log"
bench grpc-2 grpc 127.0.0.1:50051
bench http-completions-2 openai-completions 127.0.0.1:8000
curl -s localhost:8000/metrics | grep -E "^splitserve_router_merged_steps_total" > "$OUT/merged_steps.txt"
pkill -f "splitserve.cli (router|decode)"; sleep 3
echo "steps merged for clients that fell behind, all runs: $(cat "$OUT/merged_steps.txt")"
python3 - "$OUT/runs" <<'EOF'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
rows = []
for label in ("grpc-1", "http-completions-1", "http-chat", "grpc-2", "http-completions-2"):
    path = runs / f"{label}.json"
    if not path.exists():
        rows.append((label, None)); continue
    point = json.loads(path.read_text())["points"][0]
    m, ok = point["metrics"], [r for r in point["records"] if r["error_code"] is None]
    events = sum(len(r["chunk_times"]) for r in ok) / max(len(ok), 1)
    rows.append((label, (m["completed"], m["request_throughput"], m["mean_ttft_ms"], m["mean_tpot_ms"], events)))
sdk = runs / "openai-sdk.json"
if sdk.exists():
    s = json.loads(sdk.read_text())
    rows.append(("openai-sdk (independent)", (s["completed"], s["request_throughput"], s["mean_ttft_ms"], s["mean_tpot_ms"], s["mean_events_per_request"])))
print(f"\n{'run':26} {'ok':>4} {'req/s':>8} {'TTFT ms':>9} {'TPOT ms':>8} {'events/req':>10}")
for label, v in rows:
    print(f"{label:26} " + ("missing" if v is None else f"{v[0]:>4} {v[1]:>8.2f} {v[2] or 0:>9.1f} {v[3] or 0:>8.2f} {v[4]:>10.1f}"))
best = {k: max((v[1] for l, v in rows if v and l.startswith(k)), default=None) for k in ("grpc", "http-completions")}
if best["grpc"] and best["http-completions"]:
    print(f"HTTP/gRPC req/s (best of two each): {best['http-completions'] / best['grpc']:.2f}")
EOF
(cd "$OUT" && tar czf http_vs_grpc.tgz runs *.log merged_steps.txt $(ls profile-router-http.txt 2>/dev/null) && rm -rf runs)
