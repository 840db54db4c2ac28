#!/usr/bin/env bash
# Issue 7's step numbers on one H100 with the code as it stands (async scheduling in the
# engine): every GPU test (kernels over their shape range, CUDA graphs, async scheduling, the
# batched sampler), then bench/gpu_decode.py for both shapes at batch 1, 64 and 256 (1k context)
# and batch 1 at 32k, the 8B prefill, the whole engine at batch 64 (sync and async) and
# transformers generate on the 1B shape, and the plot.
set -uo pipefail
source bench/device_env.sh || exit 1
timeout 200 python3 -m pytest -q -p no:cacheprovider -n 8 -m gpu tests/kernels tests/engine > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -2 "$OUT/gpu_tests.log"
timeout 460 python3 bench/gpu_decode.py --presets llama-3.2-1b llama-3.1-8b --batch-sizes 1 64 256 --context 1024 \
    --long-context 32768 --ablation-batch-sizes --engine-batch 64 --hf-batch 64 --iters 30 \
    --out "$OUT/gpu_decode_h100_async.json" > "$OUT/decode.log" 2>&1
echo "decode rc=$?"; grep -v "^  batch\|^  attention" "$OUT/decode.log" | tail -22
python3 bench/gpu_decode.py --plot "$OUT/gpu_decode_h100_async.json" "$OUT/gpu_decode_h100_async.png" > /dev/null 2>&1
(cd "$OUT" && tar czf logs.tgz gpu_tests.log decode.log gpus.txt $(ls pip.log 2>/dev/null) && rm -f gpu_tests.log decode.log pip.log gpus.txt)
