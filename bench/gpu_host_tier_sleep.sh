#!/usr/bin/env bash
# Issue 23 on one H200 (not yet run: written in a session without GPU time). llama-3.1-8b shape,
# random weights, bf16:
#  1. bench/host_tier.py: 64 conversations x 6 turns (2048-token system prompt, 128-token user
#     turns, 64-token answers: ~200k tokens of prefixes) against an 8 GiB KV cache (~65k tokens),
#     without and with a 64 GiB pinned host tier: prefix hit rate and TTFT.
#  2. bench/cold_start.py: decode worker start-to-ready with Triton's cache cold, warm, and warm
#     with --lazy-graphs; first requests after ready; Sleep/Wake latency at levels 1 and 2.
# Run on the device machine from the repo root, with the wheels of .whl/ (see bench/README.md).
set -uo pipefail
source bench/device_env.sh || exit 1  # wheels, this checkout, $OUT, $OUT/gpus.txt
[ -f /tmp/llama8b/config.json ] || python3 -m splitserve.cli model init /tmp/llama8b --arch llama --preset llama-3.1-8b --device cuda
python3 bench/host_tier.py --model /tmp/llama8b --device cuda --dtype bfloat16 --kv-cache-mb 8192 --host-kv-cache-mb 65536 \
    --conversations 64 --turns 6 --system-len 2048 --user-len 128 --output-len 64 --max-num-seqs 64 \
    --out "$OUT/host_tier_8b.json" 2>&1 | tail -30 | tee "$OUT/host_tier_8b.log"
python3 bench/cold_start.py --model /tmp/llama8b --device cuda --out "$OUT/cold_start_8b.json" 2>&1 | tail -20 | tee "$OUT/cold_start_8b.log"
(cd "$OUT" && tar czf issue23.tgz host_tier_8b.* cold_start*)
