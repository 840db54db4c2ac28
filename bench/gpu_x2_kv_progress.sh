#!/usr/bin/env bash
# Issue 4 on nvidia-h200-x2: GPU-to-GPU KV transfer through NIXL with the progress thread's poll
# delay at splitserve's 1 ms (sleeps in poll) and at NIXL's own 0 (busy spin), same call, with
# the torch copy ceiling measured in each run.
set -o pipefail
source bench/device_env.sh || exit 1
for delay in 1000 0; do
    echo "== progress thread delay ${delay} us"
    SPLITSERVE_NIXL_PROGRESS_DELAY_US=$delay timeout 150 python3 bench/kv_transfer.py --device cuda \
        --blocks 16,64,256 --block-sizes 32 --layouts block_major --out "$OUT/kv_delay$delay.json" 2>&1 \
        | tee "$OUT/kv_delay$delay.log" | grep "^block_major"
done
