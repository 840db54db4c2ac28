"""FP8 under tensor parallelism (two real processes, gloo, on the tiny fp32 llama).

The measured KV scales are the model's whatever the TP size (each rank's largest |K|, |V| is
all-reduced with MAX), so TP=2 and TP=1 workers agree at the KV handshake, and an fp8 KV cache
gives TP=2 the logits of TP=1 to float noise. FP8 weights are quantized per rank: a row-parallel
layer's shard has scales of its own, as do the activations it sees, so logits move by the
quantization itself (measured 0.071 relative, 2026-12-03) but the argmax holds.
"""
from __future__ import annotations

import pytest
import torch

from splitserve.config import CacheConfig, ModelConfig, ParallelConfig
from splitserve.engine.model_runner import ModelRunner
from splitserve.parallel import TPModelRunner
from test_tp_equivalence import prefill_logits


@pytest.mark.parametrize(("quantization", "max_rel_err"), [(None, 1e-4), ("fp8", 0.15)], ids=["fp8_kv", "fp8_kv_and_weights"])
def test_tp2_fp8_matches_tp1(llama_tiny_dir, quantization, max_rel_err):
    model = ModelConfig(llama_tiny_dir, dtype=torch.float32, quantization=quantization)
    cache = CacheConfig(block_size=4, num_blocks=160, kv_cache_dtype="fp8")
    tp1 = ModelRunner(model, cache)
    expected = prefill_logits(tp1)
    tp2 = TPModelRunner(model, cache, ParallelConfig(2))
    try:
        logits = prefill_logits(tp2)
        assert tp2.kv_cache.dtype == torch.float8_e4m3fn and tp2.quantization == (quantization or "none")
        assert tp2.kv_scales_id == tp1.kv_scales_id != ""
    finally:
        tp2.close()
    assert ((logits - expected).norm() / expected.norm()).item() < max_rel_err
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
