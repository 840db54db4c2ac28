#!/usr/bin/env bash
# Issue 8 on nvidia-h200-x2: TP=2 exact against TP=1 in fp32, the 8B decode step at TP=1/2, and
# the collectives' share (bench/tp_decode.py). Three separate runs, each with its own time
# limit and a stack dump every 60 s, so one hang (the check hung under NCCL on 2026-11-22)
# neither hides the others nor goes undiagnosed. Results and logs under $OUT.
set -o pipefail
source bench/device_env.sh || exit 1
run() {  # name, limit, args...
    local name=$1 limit=$2; shift 2
    NCCL_DEBUG=WARN timeout "$limit" python3 bench/tp_decode.py --watchdog-s 60 --checkpoint-dir /dev/shm/tp \
        --out "$OUT/tp_$name.json" "$@" > "$OUT/tp_$name.log" 2>&1
    echo "== $name: exit $?"; grep -v "^\[\|^  File\|^Thread\|^Current thread\|^$" "$OUT/tp_$name.log" | tail -8
}
# One TP size per process: a TP=2 group after a TP=1 runner in the same process hung once.
run steps_tp2 130 --preset llama-3.1-8b --tp-sizes 2 --batch-sizes 1 64 --context 1024 --iters 20 --no-collectives
run steps_tp1 100 --preset llama-3.1-8b --tp-sizes 1 --batch-sizes 1 64 --context 1024 --iters 20
run check 100 --check --check-archs llama qwen3
run collectives 100 --preset llama-3.1-8b --tp-sizes 2 --batch-sizes 1 64 --collectives-only
# The teardown test (two GPUs): close() of a TP group whose ranks replayed decode graphs returns.
NCCL_DEBUG=WARN timeout 120 python3 -m pytest -q -p no:cacheprovider tests/parallel/test_tp_gpu_teardown.py \
    > "$OUT/teardown_test.log" 2>&1
echo "== teardown test: exit $?"; tail -3 "$OUT/teardown_test.log"
# The device tool returns only a few files per call: pack the logs into one.
(cd "$OUT" && tar czf tp.tgz tp_* teardown_test.log gpus.txt && rm -f tp_* teardown_test.log)
