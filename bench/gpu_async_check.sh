#!/usr/bin/env bash
# Async scheduling on one GPU, in one device call: the GPU tests of the engine (token-exact
# async against sync and transformers), the 1B engine decode step sync vs async against
# transformers generate at batch 64, then the serving run of bench/gpu_serve.sh in both modes.
set -uo pipefail
source bench/device_env.sh || exit 1
python3 -m pytest -q -p no:cacheprovider tests/engine/test_async_scheduling.py tests/engine/test_cuda_graphs.py \
    > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"; tail -3 "$OUT/gpu_tests.log"
python3 bench/gpu_decode.py --presets llama-3.2-1b --batch-sizes 1 64 --long-context 0 --prefill-tokens 0 \
    --ablation-batch-sizes --engine-batch 64 --hf-batch 64 --iters 30 --out "$OUT/decode_1b.json" > "$OUT/decode_1b.log" 2>&1
grep -E "engine decode|transformers|copy" "$OUT/decode_1b.log"
bash bench/gpu_serve.sh
(cd "$OUT" && tar czf check.tgz gpu_tests.log decode_1b* gpus.txt $(ls pip.log 2>/dev/null) \
    && rm -f gpu_tests.log decode_1b* gpus.txt pip.log)
