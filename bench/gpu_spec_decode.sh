#!/usr/bin/env bash
# Speculative decoding on one H200 (not yet run: written in a session without GPU time).
# Two device calls on one warm machine (each under the 10-minute limit); the checkpoints are
# kept in /tmp/spec-ckpt between them:
#   PART=1 bash bench/gpu_spec_decode.sh   # GPU tests of the speculative engine, checkpoints, batch 1
#   PART=2 bash bench/gpu_spec_decode.sh   # batch 8 and 32
# Results: $OUT/spec_b*.json and .log (bench/spec_decode.py prints one line per mode), to be
# recorded under bench/results/spec_decode_h200/ with this command.
set -uo pipefail
source bench/device_env.sh || exit 1
CKPT=/tmp/spec-ckpt
COMMON=(--preset llama-3.1-8b --device cuda --checkpoints "$CKPT" --input-len 512 --output-len 128
        --num-speculative-tokens 4 --draft-layers 2 --kv-cache-gb 16)
if [ "${PART:-1}" = 1 ]; then
    python3 -m pytest -q -p no:cacheprovider tests/engine/test_spec_greedy.py tests/engine/test_spec_rejection.py \
        > "$OUT/gpu_spec_tests.log" 2>&1; echo "gpu tests rc=$?"; tail -3 "$OUT/gpu_spec_tests.log"
    python3 bench/spec_decode.py "${COMMON[@]}" --batch-sizes 1 --out "$OUT/spec_b1.json" > "$OUT/spec_b1.log" 2>&1
    grep -E "^batch|^#" "$OUT/spec_b1.log"
else
    python3 bench/spec_decode.py "${COMMON[@]}" --batch-sizes 8 32 --out "$OUT/spec_b8_32.json" > "$OUT/spec_b8_32.log" 2>&1
    grep -E "^batch|^#" "$OUT/spec_b8_32.log"
fi
