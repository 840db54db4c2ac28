#!/usr/bin/env bash
# A/B on one H100: the serving run of bench/gpu_serve.sh with the services' GIL switch interval
# at Python's default (5 ms) and at splitserve's (0.5 ms), same machine, same call.
set -uo pipefail
OUT=${OUT:-/tmp/out}
for sw in 0.005 0.0005; do
    echo "== switch interval $sw s"
    SPLITSERVE_SWITCH_INTERVAL_S=$sw OUT=$OUT/sw$sw bash bench/gpu_serve.sh > /tmp/sw$sw.txt 2>&1
    grep -i "Request throughput\|Output token throughput\|Median TTFT\|Median TPOT\|P99 ITL\|requests/s" /tmp/sw$sw.txt
done
(cd "$OUT" && tar czf switch.tgz sw* && rm -rf sw0*)
