"""The engine over an fp8 KV cache and fp8 weights (CPU reference path): capacity, and tokens that
do not depend on how the prompt's KV got into the cache (whole, in chunks, or from the prefix cache)."""
from __future__ import annotations

import pytest
import torch

from splitserve.config import CacheConfig, ConfigError, EngineConfig, ModelConfig, SchedulerConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.llm import LLM

PROMPTS = [list(range(3, 60)), list(range(3, 40)) + [500, 501, 502], [9, 8, 7] * 9]
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _engine(model_dir, max_num_batched_tokens: int, prefix_caching: bool = True) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=ModelConfig(model_dir, dtype=torch.float32, quantization="fp8"),
            cache=CacheConfig(block_size=4, num_blocks=128, kv_cache_dtype="fp8", enable_prefix_caching=prefix_caching),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens),
        )
    )


def test_an_fp8_cache_holds_twice_the_blocks_of_bf16_in_one_budget(llama_tiny_dir):
    budget = CacheConfig(block_size=16, kv_cache_bytes=1 << 20)
    bf16 = LLM(llama_tiny_dir, dtype="bfloat16", cache=budget).engine.runner
    fp8 = LLM(llama_tiny_dir, dtype="bfloat16", cache=CacheConfig(block_size=16, kv_cache_bytes=1 << 20, kv_cache_dtype="fp8")).engine.runner
    assert fp8.block_bytes * 2 == bf16.block_bytes
    assert fp8.num_blocks == 2 * bf16.num_blocks == 2 * ((1 << 20) // bf16.block_bytes)


def test_tokens_do_not_depend_on_how_the_kv_was_computed(llama_tiny_dir, run_engine):
    whole = _engine(llama_tiny_dir, 2048, prefix_caching=False)
    chunked = _engine(llama_tiny_dir, 7)  # prompts in 7-token chunks, the later ones hitting earlier ones' blocks
    results = []
    for engine in (whole, chunked):
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"r{i}", prompt, PARAMS)
        results.append(run_engine(engine))
    assert results[0] == results[1]
    assert chunked.stats().num_prefix_hit_tokens > 0  # the second prompt read the first one's fp8 blocks


def test_offline_llm_serves_fp8(llama_tiny_dir):
    llm = LLM(llama_tiny_dir, quantization="fp8", cache=CacheConfig(block_size=4, num_blocks=64, kv_cache_dtype="fp8"))
    out = llm.generate([PROMPTS[0]], PARAMS)
    assert len(out[0].token_ids) == 8
    assert llm.engine.runner.quantization == "fp8" and llm.engine.runner.kv_cache.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize(("field", "kwargs"), [("kv_cache_dtype", {"kv_cache_dtype": "int8"})])
def test_unknown_kv_cache_dtype_is_refused_by_name(field, kwargs):
    with pytest.raises(ConfigError, match=field):
        CacheConfig(**kwargs)


def test_unknown_quantization_is_refused_by_name(llama_tiny_dir):
    with pytest.raises(ConfigError, match="quantization"):
        ModelConfig(llama_tiny_dir, quantization="int4")
