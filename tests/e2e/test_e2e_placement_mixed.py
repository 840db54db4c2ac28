"""A decode worker in a mixed role (--accept-prefill) prefills for another decode worker, in
real processes on CPU: the router's choice shows in its placement metric and in the workers'
own counters (which one computed the prompt, which one pulled KV), and the tokens are the ones
the same prompt gives when prefilled where it is decoded.

Two decode workers and no prefill worker. decode-1 (mixed) has 40 KV blocks against decode-0's
512, so the router decodes on decode-0 (the least KV used), and decode-1 is idle: it has the
headroom to prefill. The profile is written by the test (1 ms per prompt token, a 50 ms ITL
SLO), so the decisions follow from the workers' state, not from this machine's speed."""
from __future__ import annotations

import pytest

from splitserve.client import Client
from splitserve.testing.cluster import Cluster, wait_until
from test_e2e_placement import PROMPT, _placements, profile_file


@pytest.fixture(scope="module")
def cluster(e2e_model_dir, tmp_path_factory):
    path = profile_file(tmp_path_factory.mktemp("placement_mixed"))
    cluster = Cluster(e2e_model_dir, ["--placement-profile", str(path), "--placement-slo", "ttft:500,itl:50"])
    try:
        cluster.add_workers(("decode", "decode-0", ["--num-blocks", "512"]),
                            ("decode", "decode-1", ["--num-blocks", "40", "--accept-prefill"]))
        yield cluster
    finally:
        cluster.stop()


def _stats(cluster: Cluster, worker_id: str):
    return cluster.workers[["decode-0", "decode-1"].index(worker_id)].stats()  # in add_workers' order


def test_busy_decode_worker_gets_its_prompt_prefilled_by_the_idle_mixed_worker(cluster):
    client = Client(cluster.address)
    try:
        wait_until(lambda: len(client.model_info().model) > 0, timeout=30)
        # A long generation on decode-0 (both idle: decode-1's small cache makes decode-0 cheaper).
        running = client.stream(list(range(300, 320)), max_tokens=400, ignore_eos=True, timeout=300)
        next(iter(running))
        assert wait_until(lambda: _stats(cluster, "decode-0").num_running == 1, timeout=30)  # its stats lag a step
        computed_before = _stats(cluster, "decode-1").num_prompt_tokens_computed
        mixed_out = client.complete(PROMPT, max_tokens=6, ignore_eos=True, timeout=120)
        running.cancel()
        # Both idle again: the same prompt is prefilled where it is decoded; greedy, so the same tokens.
        assert wait_until(lambda: _stats(cluster, "decode-0").num_running == 0, timeout=60)
        local_out = client.complete(PROMPT, max_tokens=6, ignore_eos=True, timeout=120)
    finally:
        client.close()
    placements = _placements(cluster)
    # The prompt in decode-0's steps would stall its running request 200 ms; decode-1 has room.
    assert placements.get(("mixed", "itl")) == 1.0
    # The long generation's 20 tokens and the last request stay local (as "no_prefill_worker" when
    # the router had not listed decode-1 yet on a loaded machine, else "itl").
    assert sum(n for (where, _), n in placements.items() if where == "local") == 2.0
    assert sum(placements.values()) == 3.0
    assert _stats(cluster, "decode-1").num_prompt_tokens_computed - computed_before >= len(PROMPT)
    decode0 = _stats(cluster, "decode-0")
    assert decode0.num_kv_transfers == 1  # it pulled the prompt's KV from decode-1
    assert len(mixed_out.token_ids) == 6 and mixed_out.token_ids == local_out.token_ids
