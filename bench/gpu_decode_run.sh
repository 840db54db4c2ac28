#!/usr/bin/env bash
# Issue 7 on the lent GPU machine: install, the GPU tests (kernels, CUDA graphs), then the decode benchmark.
#   bash bench/gpu_decode_run.sh tests bench-all   (logs and results under $OUT; kernels, bench-1b, bench-8b: parts)
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import splitserve.kernels.backend" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
fi
for what in "$@"; do
    case "$what" in
    tests)
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$OUT/nvidia_smi.txt"
        timeout 150 python3 -m pytest -q -p no:cacheprovider -n 8 tests/kernels 2>&1 | tee "$OUT/test_kernels.log" | tail -25
        timeout 150 python3 -m pytest -q -p no:cacheprovider -n 4 tests/engine/test_cuda_graphs.py 2>&1 | tee "$OUT/test_cuda_graphs.log" | tail -25
        ;;
    bench-1b)
        timeout 270 python3 bench/gpu_decode.py --presets llama-3.2-1b --batch-sizes 1 64 128 --context 1024 \
            --long-context 32768 --hf-batch 64 --out "$OUT/gpu_decode_1b.json" 2>&1 | tee "$OUT/bench_1b.log"
        ;;
    kernels)
        timeout 90 python3 -m pytest -q -p no:cacheprovider -n 8 tests/kernels 2>&1 | tee "$OUT/test_kernels.log" | tail -5
        ;;
    bench-1b-nohf)
        timeout 150 python3 bench/gpu_decode.py --presets llama-3.2-1b --batch-sizes 1 64 128 --context 1024 \
            --long-context 32768 --out "$OUT/gpu_decode_1b.json" 2>&1 | tee "$OUT/bench_1b.log" | grep -v "^  batch"
        ;;
    bench-all)
        timeout 400 python3 bench/gpu_decode.py --presets llama-3.2-1b llama-3.1-8b --batch-sizes 1 64 128 --context 1024 \
            --long-context 32768 --hf-batch 64 --out "$OUT/gpu_decode_h100.json" 2>&1 | tee "$OUT/bench_all.log"
        ;;
    bench-8b)
        timeout 330 python3 bench/gpu_decode.py --presets llama-3.1-8b --batch-sizes 1 64 128 --context 1024 \
            --long-context 32768 --out "$OUT/gpu_decode_8b.json" 2>&1 | tee "$OUT/bench_8b.log"
        ;;
    esac
done
