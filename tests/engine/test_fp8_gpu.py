"""FP8 KV cache and FP8 weights on the GPU: the Triton kernels, torch._scaled_mm, CUDA graphs and
async scheduling (skipped without a CUDA GPU of compute capability 8.9 or later).

The CPU reference path is tested in tests/models/test_fp8_agreement.py; here the same agreement
thresholds hold for the GPU path, and decode steps replayed as CUDA graphs under async scheduling
give the tokens that eager steps give.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from splitserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from fp8_measure import agreement, log_probs
from test_fp8_agreement import THRESHOLDS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs a CUDA GPU with fp8"),
]
ARCHS = ("llama", "qwen2", "qwen3", "mistral")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("kv_cache_dtype", "quantization"), list(THRESHOLDS), ids=["fp8_kv", "fp8_weights", "fp8_both"])
def test_gpu_fp8_agrees_with_gpu_bf16(tiny_checkpoint, arch, kv_cache_dtype, quantization):
    model_dir = tiny_checkpoint(arch)
    reference = log_probs(model_dir, "bfloat16", device="cuda")
    top1, kl = agreement(reference, log_probs(model_dir, "bfloat16", kv_cache_dtype, quantization, device="cuda"))
    least_top1, most_kl = THRESHOLDS[kv_cache_dtype, quantization]
    assert kl > 0 and top1 >= least_top1 and kl <= most_kl, f"{arch}: top-1 {top1:.3f}, KL {kl:.2e}"


def _engine(model_dir, async_scheduling: bool) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=ModelConfig(model_dir, dtype=torch.float32, device="cuda", quantization="fp8"),
            cache=CacheConfig(block_size=16, num_blocks=128, kv_cache_dtype="fp8"),
            scheduler=SchedulerConfig(async_scheduling=async_scheduling),
        )
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_graphs_and_async_scheduling_match_eager_steps(tiny_checkpoint, run_engine, arch):
    """fp32 activations over fp8 KV and weights: graph replays (async) and eager steps (sync) agree token for token."""
    model_dir = tiny_checkpoint(arch)
    prompts = [[(i * 31 + n) % 997 + 3 for i in range(n)] for n in (5, 19, 40, 77, 90)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    results = []
    for use_graphs in (True, False):
        engine = _engine(model_dir, async_scheduling=use_graphs)
        assert engine.runner.kv_cache.dtype == torch.float8_e4m3fn and engine.runner.quantization == "fp8"
        if not use_graphs:
            engine.runner.release_graphs()
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        results.append(run_engine(engine))
        if use_graphs:
            assert engine.runner.graphs.num_replays >= 10
    assert results[0] == results[1]
