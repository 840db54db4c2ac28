"""How much KV cache a worker or the offline LLM takes when the user gives no budget."""
from __future__ import annotations

import pytest

from splitserve.config import CPU_KV_CACHE_BYTES, CacheConfig, ConfigError
from splitserve.llm import LLM

GIB = 1024**3


def test_on_cuda_the_offline_llm_sizes_its_cache_from_free_gpu_memory(tmp_path):
    cache = LLM.engine_config(tmp_path, device="cuda").cache
    assert cache.kv_cache_bytes is None  # not the CPU's fixed 256 MiB
    assert cache.budget_bytes(free_device_bytes=100 * GIB) == int(0.9 * 100 * GIB)
    assert LLM.engine_config(tmp_path, device="cuda:1").cache.kv_cache_bytes is None


def test_on_the_cpu_the_offline_llm_keeps_a_fixed_budget(tmp_path):
    assert LLM.engine_config(tmp_path, device="cpu").cache.budget_bytes(None) == CPU_KV_CACHE_BYTES


def test_a_given_cache_config_wins(tmp_path):
    fixed = CacheConfig(kv_cache_bytes=GIB)
    assert LLM.engine_config(tmp_path, device="cuda", cache=fixed).cache.budget_bytes(80 * GIB) == GIB
    share = CacheConfig(kv_cache_bytes=None, gpu_memory_utilization=0.5)
    assert LLM.engine_config(tmp_path, device="cuda", cache=share).cache.budget_bytes(80 * GIB) == 40 * GIB


def test_a_share_of_free_memory_needs_a_device_that_reports_it():
    with pytest.raises(ConfigError, match="kv_cache_bytes"):
        CacheConfig(kv_cache_bytes=None).budget_bytes(None)


def test_the_offline_llm_runs_with_its_default_budget_on_the_cpu(llama_tiny_dir):
    out = LLM(llama_tiny_dir).generate([[5, 6, 7]])
    assert len(out[0].token_ids) > 0
