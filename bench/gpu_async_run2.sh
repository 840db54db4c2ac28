#!/usr/bin/env bash
# Second async-scheduling call on one GPU: the engine's GPU tests (the batched sampler on CUDA
# too), serving greedy with async scheduling (a repeat of bench/gpu_async_check.sh's), serving
# with sampling (temperature 1.0, top-p 0.95) async and synchronous, then the 8B shape's decode
# steps, prefill and engine (sync and async) against its floors.
set -uo pipefail
source bench/device_env.sh || exit 1
python3 -m pytest -q -p no:cacheprovider tests/engine/test_async_scheduling.py tests/engine/test_cuda_graphs.py \
    tests/engine/test_sampler.py > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"; tail -2 "$OUT/gpu_tests.log"
TAG=greedy MODES=auto bash bench/gpu_serve.sh > "$OUT/serve_greedy.out" 2>&1
TAG=sampled MODES="auto off" OFFLINE=0 SAMPLING="--temperature 1.0 --top-p 0.95" bash bench/gpu_serve.sh > "$OUT/serve_sampled.out" 2>&1
grep -h "Request throughput\|Mean TPOT" "$OUT"/serve_*.out
python3 bench/gpu_decode.py --presets llama-3.1-8b --batch-sizes 1 64 --long-context 0 --prefill-tokens 4096 \
    --ablation-batch-sizes --engine-batch 64 --iters 30 --out "$OUT/decode_8b.json" > "$OUT/decode_8b.log" 2>&1
tail -8 "$OUT/decode_8b.log"
(cd "$OUT" && tar czf logs.tgz gpu_tests.log serve_*.out decode_8b.log gpus.txt $(ls pip.log 2>/dev/null) \
    && rm -f gpu_tests.log serve_*.out decode_8b.log gpus.txt pip.log)
