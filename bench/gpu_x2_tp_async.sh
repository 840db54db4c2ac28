#!/usr/bin/env bash
# TP=2 with async scheduling on nvidia-h200-x2: the exactness check (TP=2 against TP=1 in fp32,
# through LLMEngine, which runs async on a GPU), the two-GPU teardown test, then the 8B engine
# at TP=2, batch 64, synchronous against async (bench/tp_engine.py).
set -o pipefail
source bench/device_env.sh || exit 1
NCCL_DEBUG=WARN timeout 100 python3 bench/tp_decode.py --watchdog-s 60 --checkpoint-dir /dev/shm/tp \
    --check --check-archs llama qwen3 --out "$OUT/tp_check.json" > "$OUT/tp_check.log" 2>&1
echo "== check: exit $?"; grep -v "^\[\|^  File\|^Thread\|^Current thread\|^$" "$OUT/tp_check.log" | tail -6
NCCL_DEBUG=WARN timeout 120 python3 -m pytest -q -p no:cacheprovider tests/parallel/test_tp_gpu_teardown.py \
    > "$OUT/teardown_test.log" 2>&1
echo "== teardown test: exit $?"; tail -2 "$OUT/teardown_test.log"
NCCL_DEBUG=WARN timeout 300 python3 bench/tp_engine.py --preset llama-3.1-8b --tp-size 2 --batch 64 \
    --out "$OUT/tp_engine.json" > "$OUT/tp_engine.log" 2>&1
echo "== tp engine: exit $?"; grep "engine decode\|Error" "$OUT/tp_engine.log" | tail -4
(cd "$OUT" && tar czf tp_async.tgz tp_check.log teardown_test.log tp_engine.log gpus.txt $(ls pip.log 2>/dev/null) \
    && rm -f tp_check.log teardown_test.log tp_engine.log pip.log)
