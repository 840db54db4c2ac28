"""An fp8 KV cache across real processes: prefill and decode workers move fp8 blocks, a decode
worker of another KV dtype refuses them, and the APIs report what each pool runs."""
from __future__ import annotations

import json
import urllib.request

import pytest

from splitserve.client import Client
from splitserve.testing.cluster import wait_until

FP8 = ["--kv-cache-dtype", "fp8"]
# The e2e checkpoint (tiny llama, tests/conftest.py): 2 KV heads of 16 dims, 2 layers; blocks of 16 tokens.
FP8_BLOCK_BYTES = 2 * 2 * 2 * 16 * 16
PROMPTS = [list(range(3, 73)), [(i * 37) % 1000 + 3 for i in range(45)], [7, 11, 13] * 11]


def _idle(*services) -> bool:
    return all(s.stats().num_free_blocks == s.stats().num_total_blocks and not s.stats().num_running for s in services)


def test_fp8_kv_across_the_hop_equals_fp8_kv_colocated(start_cluster):
    disaggregated = start_cluster(worker_args=FP8)
    prefill, decode = disaggregated.add_workers(("prefill", "prefill-fp8"), ("decode", "decode-fp8"))
    client = Client(disaggregated.address)
    hop = [client.complete(p, max_tokens=12, ignore_eos=True, timeout=60).token_ids for p in PROMPTS]
    stats = decode.stats()
    assert stats.num_kv_transfers == len(PROMPTS) and stats.num_local_prefills == 0
    # fp8 blocks moved: one byte per value, a quarter of this fp32 checkpoint's.
    assert stats.num_kv_bytes_transferred == sum(-(-len(p) // 16) for p in PROMPTS) * FP8_BLOCK_BYTES
    info = client.model_info()
    assert dict(info.kv_cache_dtype) == {"prefill": "float8_e4m3fn", "decode": "float8_e4m3fn"}
    assert dict(info.quantization) == {"prefill": "none", "decode": "none"}
    with urllib.request.urlopen(f"{disaggregated.router.http_url}/models", timeout=10) as response:
        card = json.load(response)["data"][0]
    assert card["kv_cache_dtype"] == {"prefill": "float8_e4m3fn", "decode": "float8_e4m3fn"}
    assert wait_until(lambda: _idle(prefill, decode))

    colocated = start_cluster(worker_args=FP8)
    (alone,) = colocated.add_workers(("decode", "decode-alone"))
    local = [Client(colocated.address).complete(p, max_tokens=12, ignore_eos=True, timeout=60).token_ids for p in PROMPTS]
    assert alone.stats().num_local_prefills == len(PROMPTS) and alone.stats().num_kv_transfers == 0
    assert hop == local


def test_a_decode_worker_of_another_kv_dtype_refuses_fp8_blocks(start_cluster):
    cluster = start_cluster()
    prefill, decode = cluster.add_workers(("prefill", "prefill-fp8", FP8), ("decode", "decode-fp32"))
    result = Client(cluster.address).complete(PROMPTS[0], max_tokens=4, ignore_eos=True, timeout=60)
    assert len(result.token_ids) == 4
    assert decode.stats().num_kv_transfers == 0 and decode.stats().num_local_prefills == 1
    assert "float8_e4m3fn" in decode.output() and "dtype" in decode.output()
    assert wait_until(lambda: _idle(prefill, decode))


@pytest.mark.slow
def test_fp8_kv_moves_from_a_tp2_prefill_pool_to_a_tp1_decode_pool(start_cluster):
    """Head slices of fp8 blocks, under scales both pools measured alike, give the colocated tokens."""
    disaggregated = start_cluster(worker_args=[*FP8, "--num-blocks", "96"])
    prefill, decode = disaggregated.add_workers(("prefill", "prefill-tp2", ["--tp-size", "2"]), ("decode", "decode-tp1"))
    hop = [Client(disaggregated.address).complete(p, max_tokens=8, ignore_eos=True, timeout=120).token_ids for p in PROMPTS]
    assert decode.stats().num_kv_transfers == len(PROMPTS) and decode.stats().num_local_prefills == 0
    assert wait_until(lambda: _idle(prefill, decode))

    colocated = start_cluster(worker_args=[*FP8, "--num-blocks", "96"])
    colocated.add_workers(("decode", "decode-alone"))
    assert hop == [Client(colocated.address).complete(p, max_tokens=8, ignore_eos=True, timeout=120).token_ids for p in PROMPTS]
