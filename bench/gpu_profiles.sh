#!/usr/bin/env bash
# Step and KV-transfer profiles (`splitserve profile`) of the llama-3.1-8b and qwen3-0.6b shapes
# on one GPU (random bf16 weights written on the machine), TP=1, for `splitserve sim` and the
# router's placement. One device call, about 4 minutes on an H200:
#
#   bash bench/gpu_profiles.sh          (with .whl/ carried; see bench/README.md)
#
# Writes $OUT/profile-<shape>.json and $OUT/profile-<shape>.log; prints the fitted models last.
# The KV transfers are READs between two agents on the one GPU (a second GPU is not at hand).
set -uo pipefail
source bench/device_env.sh || exit 1  # wheels, this checkout, $OUT, $OUT/gpus.txt
profile() {
    name=$1 arch=$2 dir=/dev/shm/$1
    [ -f $dir/config.json ] || python3 -m splitserve.cli model init $dir --arch $arch --preset $name --device cuda \
        > "$OUT/init-$name.log" 2>&1 || { tail -5 "$OUT/init-$name.log"; return 1; }
    # Grid: KV for 256 rows x 2,048 tokens (32k blocks, ~64 GiB) fits beside the weights.
    timeout 150 python3 -m splitserve.cli profile --model $dir --name $name --device cuda --dtype bfloat16 \
        --prefill-tokens 128,512,1024,2048,4096,8192 --prefill-contexts 0,4096 \
        --decode-batches 1,16,64,128,256 --decode-contexts 256,1024,2048 \
        --transfer-blocks 1,16,64,256,1024 --iters 10 --warmup 3 \
        --out "$OUT/profile-$name.json" > "$OUT/profile-$name.log" 2>&1
    echo "== $name (exit $?)"; grep -E "model:|wrote|Error|error" "$OUT/profile-$name.log" | tail -4
}
profile qwen3-0.6b qwen3
profile llama-3.1-8b llama
