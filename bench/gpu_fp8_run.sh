#!/usr/bin/env bash
# Issue 21 on one H200 (nvidia-h200), in device calls of at most 10 minutes each:
#   tests  the GPU tests of the fp8 paths (Triton fp8 KV kernels, _scaled_mm, CUDA graphs + async)
#   bench  bench/gpu_fp8.py, llama-3.1-8b shape: decode at batch 1/64/256 x 1k context and batch 1
#          x 32k, for bf16, fp8 KV, fp8 weights and both, each against its own floor; KV blocks per
#          GiB; 4k-token prefill against the fp8 matmul rate of the same run; the linear shapes alone
#   (VARIANTS="bf16 fp8_kv" etc. splits the bench over calls; each call adds to its own JSON.)
#   bash bench/gpu_fp8_run.sh tests bench          (results under $OUT/fp8/)
set -o pipefail
source bench/device_env.sh || exit 1
R=$OUT/fp8
mkdir -p "$R"
for what in "$@"; do
    case "$what" in
    tests)
        timeout 300 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kv_fp8.py tests/kernels/test_quant_fp8.py tests/engine/test_fp8_gpu.py \
            tests/kernels/test_paged_attention.py tests/kernels/test_write_kv.py 2>&1 | tee "$R/tests.log" | tail -25
        ;;
    bench)
        tag=$(echo "${VARIANTS:-all}" | tr ' ' '-')
        timeout 560 python3 bench/gpu_fp8.py --preset llama-3.1-8b --batch-sizes 1 64 256 --context 1024 --long-context 32768 \
            ${VARIANTS:+--variants $VARIANTS} --out "$R/fp8_$tag.json" 2>&1 | tee "$R/bench_$tag.log"
        ;;
    esac
done
