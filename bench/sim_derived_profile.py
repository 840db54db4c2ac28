#!/usr/bin/env python3
"""The llama-3.1-8b / H200 profile the simulator is validated with, derived from step
numbers already recorded in bench/results/ (no serving run's latency enters it), until
``bench/gpu_profiles.sh`` measures one. Every number below names its source.

    python bench/sim_derived_profile.py --engine async --out bench/results/sim_validation/llama-3.1-8b_h200_async.json
    python bench/sim_derived_profile.py --engine sync --out bench/results/sim_validation/llama-3.1-8b_h200_sync.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

from splitserve.profile.schema import ModelShape, Profile
from splitserve.profile.step_model import causal_pairs, fit, fit_transfer

# tp_h200x2/tp_steps_tp1.json: TP=1 decode step through the CUDA graph, host read-back
# included (the synchronous engine's step), context 1024.
H200_GRAPH_MS = {1: 4.804, 64: 7.672}
# gpu_decode_h100_async.json (H100): the same steps' GPU-only time over the read-back one —
# what async scheduling leaves of a step (its engine measured 9.56 against 9.51 GPU-only).
H100_GPU_OVER_GRAPH = {1: 6.31 / 6.52, 64: 9.51 / 10.21}
# gpu_decode_h100_async.json (H100), batch 64: the synchronous engine's step (10.79 ms: host
# scheduling, inputs, graph, read-back, one after another) over the graph with read-back (10.21).
H100_SYNC_ENGINE_OVER_GRAPH = 10.79 / 10.21
# H100, batch 1: context 32768 against 1024 adds 7.79 - 6.31 ms of KV reading (GPU-only),
# scaled to the H200 by the HBM bandwidths (3.35 -> 4.8 TB/s).
KV_MS_PER_TOKEN_H200 = (7.79 - 6.31) / (32768 - 1024) * 3.35 / 4.8
# gpu_decode_h100_async.json: 4096-token prefill 114.7 ms at 0.68 of the matmul rate; the
# H200 has the H100's bf16 peak, so the same time is taken.
PREFILL_4096_MS = 114.7
# kv_transfer_cuda_progress: READ p50 between two H200s (NVLink, one descriptor).
TRANSFER = [(64 * 2**20, 0.250), (256 * 2**20, 0.810), (1024 * 2**20, 3.023)]

LLAMA_8B = ModelShape("llama-3.1-8b", num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16",
                      kv_bytes_per_token=32 * 2 * 8 * 128 * 2)


def derive(engine: str) -> Profile:
    """``engine``: "async" (a step is the GPU's time) or "sync" (the synchronous engine's step)."""
    if engine == "async":
        gpu = {b: H200_GRAPH_MS[b] * H100_GPU_OVER_GRAPH[b] for b in H200_GRAPH_MS}
    else:
        gpu = {b: H200_GRAPH_MS[b] * H100_SYNC_ENGINE_OVER_GRAPH for b in H200_GRAPH_MS}
    decode = [(1, 1024, gpu[1]), (64, 1024, gpu[64]), (1, 32768, gpu[1] + (32768 - 1024) * KV_MS_PER_TOKEN_H200)]
    # A second prefill point at 2048 tokens, in proportion to the FLOPs (linear layers and
    # causal attention pairs: 2 * 6.98e9 per token, 4 * 32 heads * 128 * 32 layers per pair),
    # so the fit can tell the attention term from the linear one.
    def flops(n: int) -> float:
        return 2 * 6.98e9 * n + 4 * 32 * 128 * 32 * causal_pairs(n, 0)
    prefill = [(4096, 0, PREFILL_4096_MS), (2048, 0, PREFILL_4096_MS * flops(2048) / flops(4096))]
    return Profile(
        source="derived", device="NVIDIA H200 (derived)", model=LLAMA_8B, tp_size=1, block_size=16,
        transport="nixl-ucx cuda_ipc, GPU to GPU over NVLink", prefill=tuple(prefill), decode=tuple(decode),
        transfer=tuple(TRANSFER), step_model=fit(decode, prefill), transfer_model=fit_transfer(TRANSFER),
        notes=f"bench/sim_derived_profile.py --engine {engine}: decode from tp_h200x2/tp_steps_tp1.json scaled to "
              "the engine's step by gpu_decode_h100_async's ratios (async: GPU-only time; sync: the synchronous engine's); KV term from the H100's 32k-context step scaled by HBM bandwidth; "
              "prefill from gpu_decode_h100_async (4096 tokens, same bf16 peak), 2048 by FLOPs; transfer from "
              "kv_transfer_cuda_progress. No serving measurement used.",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=("async", "sync"), default="async")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    profile = derive(args.engine)
    profile.save(args.out)
    print(profile.step_model, profile.transfer_model, sep="\n")


if __name__ == "__main__":
    main()
