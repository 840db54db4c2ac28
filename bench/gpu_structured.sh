#!/usr/bin/env bash
# Issue 20 on one H200: the constrained-decoding engine tests on the GPU, then the decode step
# at batch 64 and 256 with 0%, 50% and 100% of requests grammar-constrained (1B and 8B shapes).
#   bash bench/gpu_structured.sh      (results under $OUT: structured_step.json and the logs)
set -uo pipefail
source bench/device_env.sh || exit 1
python3 -c "import xgrammar" 2>/dev/null || python3 -m pip install -q xgrammar >"$OUT/pip_xgrammar.log" 2>&1 \
    || { echo "xgrammar is not installed: carry its wheel in .whl/ (bench/README.md)"; exit 1; }
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/engine/test_grammar.py > "$OUT/gpu_grammar_tests.log" 2>&1
echo "grammar tests rc=$?"; tail -3 "$OUT/gpu_grammar_tests.log"
timeout 500 python3 bench/gpu_structured_step.py --presets llama-3.2-1b llama-3.1-8b --batch-sizes 64 256 \
    --fractions 0 0.5 1 --out "$OUT/structured_step.json" 2>&1 | tee "$OUT/structured_step.log" | grep -v Warning
