"""FP8 KV cache and FP8 weights against bf16, on random-weight checkpoints of the four architectures.

For each: the next-token distribution after every prefix of a fixed prompt set (8 prompts,
497 positions; tests/models/fp8_measure.py), top-1 agreement and mean KL(bf16 || fp8).

Thresholds come from a measured baseline (CPU reference path, 2026-12-03, these tiny
checkpoints, whose random weights make near-flat distributions — entropy ~5 nats over 1024
tokens — so near-ties flip top-1 far more easily than in a trained model):

    arch      bf16 vs fp32      fp8 KV            fp8 weights       both
              top-1  KL         top-1  KL         top-1  KL         top-1  KL
    llama     0.974  5.1e-4     0.916  6.5e-3     0.813  3.7e-2     0.811  4.3e-2
    qwen2     0.980  3.5e-4     0.928  4.5e-3     0.841  2.4e-2     0.797  2.9e-2
    qwen3     0.968  7.2e-4     0.891  8.5e-3     0.753  4.6e-2     0.751  5.4e-2
    mistral   0.968  4.7e-4     0.901  6.4e-3     0.777  3.4e-2     0.747  4.1e-2

Each threshold is the worst measured value with some room (the runs are deterministic, the
room is for other CPUs' matmul order). A wrong scale (e.g. K and V read back unscaled) puts
KL above 1 nat, far outside them.
"""
from __future__ import annotations

import pytest
import torch

from fp8_measure import agreement, log_probs

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
# (kv_cache_dtype, quantization) -> (least top-1 agreement, largest mean KL in nats)
THRESHOLDS = {
    ("fp8", None): (0.86, 0.012),
    ("auto", "fp8"): (0.72, 0.065),
    ("fp8", "fp8"): (0.70, 0.075),
}


@pytest.fixture(scope="module")
def bf16_reference(tiny_checkpoint):
    cache: dict[str, torch.Tensor] = {}

    def get(arch: str) -> torch.Tensor:
        if arch not in cache:
            cache[arch] = log_probs(tiny_checkpoint(arch), "bfloat16")
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("kv_cache_dtype", "quantization"), list(THRESHOLDS), ids=["fp8_kv", "fp8_weights", "fp8_both"])
def test_fp8_agrees_with_bf16(tiny_checkpoint, bf16_reference, arch, kv_cache_dtype, quantization):
    reference = bf16_reference(arch)
    fp8 = log_probs(tiny_checkpoint(arch), "bfloat16", kv_cache_dtype, quantization)
    top1, kl = agreement(reference, fp8)
    least_top1, most_kl = THRESHOLDS[kv_cache_dtype, quantization]
    assert kl > 0  # it did run in fp8
    assert top1 >= least_top1 and kl <= most_kl, f"{arch} {kv_cache_dtype}/{quantization}: top-1 {top1:.3f}, KL {kl:.2e}"


def test_bf16_against_fp32_is_the_floor(tiny_checkpoint):
    """The baseline the thresholds are read against: bf16 itself is closer to fp32 than any fp8 variant to bf16."""
    model_dir = tiny_checkpoint("llama")
    top1, kl = agreement(log_probs(model_dir, "float32"), log_probs(model_dir, "bfloat16"))
    assert top1 >= 0.95 and kl <= 2e-3
