"""The host KV tier in a real worker process (--host-kv-cache-mb): a prefix pushed out of a small
GPU pool by other prompts comes back from the host as a prefix hit, and the answer is token-exact."""
from __future__ import annotations

from splitserve.client import Client
from splitserve.testing.cluster import wait_until


def test_an_evicted_prefix_comes_back_from_the_host_tier(start_cluster, greedy):
    # One decode worker prefills locally (no prefill worker); 24 blocks of 16 tokens hold one long prompt at a time.
    cluster = start_cluster(worker_args=["--num-blocks", "24", "--block-size", "16", "--host-kv-cache-mb", "16"])
    (decode,) = cluster.add_workers(("decode", "decode-0"))
    client = Client(cluster.address)
    wait_until(lambda: len(client.model_info().model) > 0, timeout=30)
    prefix = list(range(3, 3 + 160))  # 10 full blocks
    assert client.complete(prefix + [7], max_tokens=4, ignore_eos=True, timeout=60).token_ids == greedy(prefix + [7], 4)
    for i in range(3):  # each takes 16 of the 24 blocks: the prefix's blocks are evicted (spilled)
        other = [500 + 11 * i + j for j in range(250)]
        assert client.complete(other, max_tokens=2, ignore_eos=True, timeout=60).token_ids == greedy(other, 2)
    hits_before = decode.stats().num_prefix_hit_tokens
    again = prefix + [9, 10]
    assert client.complete(again, max_tokens=6, ignore_eos=True, timeout=60).token_ids == greedy(again, 6)
    assert decode.stats().num_prefix_hit_tokens - hits_before == 160  # all 10 blocks, restored from the host
    client.close()
