#!/usr/bin/env bash
# The serving run of bench/gpu_serve.sh (one H100, qwen3-0.6b shape, colocated) with one router
# and with two routers of the same platform, in one call, on the same machine.
set -uo pipefail
OUT=${OUT:-/tmp/out}
for n in 1 2; do
    echo "== $n router(s)"
    ROUTERS=$n OUT=$OUT/routers$n bash bench/gpu_serve.sh > /tmp/routers$n.txt 2>&1
    grep -i "Request throughput\|Output token throughput\|Median TTFT\|Median TPOT\|P99 ITL\|requests/s\|error" /tmp/routers$n.txt
done
(cd "$OUT" && tar czf routers.tgz routers1 routers2 && rm -rf routers1 routers2)
