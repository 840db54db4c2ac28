#!/usr/bin/env bash
# The independent-client check of bench/gpu_http_vs_grpc.sh on its own (that script's openai-SDK
# run failed on the device for a missing httpx2 wheel): same server and workload, then
# `bench serve --backend openai-completions`, the openai package (bench/openai_sdk_client.py)
# and `bench serve --backend grpc`, back to back. Everything lands in $OUT/sdk_check.txt.
set -uo pipefail
source bench/device_env.sh || exit 1
MODEL=/tmp/qwen3-fullvocab
[ -f $MODEL/config.json ] || python3 -m splitserve.cli model init $MODEL --arch qwen3 --preset qwen3-0.6b --device cuda > "$OUT/model-init.log" 2>&1
python3 -m splitserve.cli router --model $MODEL --port 50051 --http-port 8000 --metrics-port -1 --max-tokens-limit 4096 > "$OUT/router.log" 2>&1 &
for i in $(seq 60); do grep -q "listening on" "$OUT/router.log" && break; sleep 1; done
python3 -m splitserve.cli decode --model $MODEL --device cuda --port 50071 --metrics-port -1 --worker-id decode-0 \
    --control-plane grpc://127.0.0.1:50051 --max-num-seqs 256 --max-num-batched-tokens 8192 > "$OUT/decode.log" 2>&1 &
for i in $(seq 180); do grep -q "listening on" "$OUT/decode.log" && break; sleep 1; done
W="--dataset random --num-prompts 500 --input-len 512 --output-len 128 --request-rate inf --seed 0 --disable-tqdm --no-plots --num-warmups 8"
{
python3 -m splitserve.cli bench serve --backend openai-completions --target 127.0.0.1:8000 $W --out "$OUT/runs" --label http-completions
python3 bench/openai_sdk_client.py --base-url http://127.0.0.1:8000/v1 --num-prompts 500 --input-len 512 --output-len 128 --out "$OUT/runs/openai-sdk.json"
python3 -m splitserve.cli bench serve --backend grpc --target 127.0.0.1:50051 $W --out "$OUT/runs" --label grpc
} > "$OUT/sdk_check.txt" 2>&1
pkill -f "splitserve.cli (router|decode)"
grep -E "Request throughput|Mean TTFT|Mean TPOT|request_throughput|mean_ttft_ms|mean_tpot_ms|mean_events|completed|Error|error" "$OUT/sdk_check.txt"
