#!/usr/bin/env bash
# Issue 20 on one H200: the constrained-decoding engine tests on the GPU, then the decode step
# at batch 64 and 256 with 0%, 50% and 100% of requests grammar-constrained (1B and 8B shapes).
#   bash bench/gpu_structured.sh      (device call with carry [".whl"]; results under $OUT: structured_step.json, logs)
set -uo pipefail
source bench/device_env.sh || exit 1
# xgrammar comes with the carried wheels (bash bench/fetch_device_wheels.sh, then carry .whl).
python3 -c "import xgrammar" || { echo "xgrammar is missing: run bench/fetch_device_wheels.sh and carry .whl"; exit 1; }
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/engine/test_grammar.py > "$OUT/gpu_grammar_tests.log" 2>&1
echo "grammar tests rc=$?"; tail -3 "$OUT/gpu_grammar_tests.log"
timeout 500 python3 bench/gpu_structured_step.py --presets llama-3.2-1b llama-3.1-8b --batch-sizes 64 256 \
    --fractions 0 0.5 1 --out "$OUT/structured_step.json" 2>&1 | tee "$OUT/structured_step.log" | grep -v Warning
