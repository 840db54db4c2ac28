"""Routing over two KV tiers: a host-tier hit scores between a GPU hit and a miss, and the
router asks the index about host tiers only of workers that have one."""
from __future__ import annotations

import pytest
from splitserve.services.router.routing import (
    CostWeights,
    PrefixAwarePolicy,
    prefill_cost,
)
from splitserve.services.router.workers import WorkerDirectory

from splitserve.controlplane import (
    KVEvent,
    LiveWorker,
    MemoryControlPlane,
    WorkerInfo,
    WorkerLoad,
)
from splitserve.controlplane.testing import run_async
from splitserve.controlplane.types import KVTier
from splitserve.engine.prefix_hash import hash_request_tokens

BLOCK_SIZE = 16


def worker(worker_id: str, host_kv_blocks: int = 1000, **load: int) -> LiveWorker:
    info = WorkerInfo(worker_id, "prefill", f"{worker_id}:50051", BLOCK_SIZE, host_kv_blocks=host_kv_blocks)
    return LiveWorker(info, WorkerLoad(num_total_blocks=100, num_free_blocks=100, **load))


def prompt(seed: int, num_blocks: int = 64) -> list[bytes]:
    return hash_request_tokens([seed * 1_000_000 + i for i in range(num_blocks * BLOCK_SIZE)], BLOCK_SIZE)


def test_a_host_hit_costs_between_a_gpu_hit_and_a_miss():
    w, weights = worker("a"), CostWeights()
    num_tokens = 64 * BLOCK_SIZE
    gpu, host, miss = (prefill_cost(w, num_tokens, 60, weights, 0), prefill_cost(w, num_tokens, 60, weights, 60),
                       prefill_cost(w, num_tokens, 0, weights))
    assert gpu < host < miss
    assert host - gpu == pytest.approx(weights.host_hit_weight * 60 * BLOCK_SIZE)
    assert prefill_cost(w, num_tokens, 60, CostWeights(host_hit_weight=1.0), 60) == miss  # a copy as dear as recomputing
    with pytest.raises(ValueError, match="host_hit_weight"):
        CostWeights(host_hit_weight=1.5)


def test_the_policy_ranks_gpu_hit_then_host_hit_then_miss():
    hashes, policy = prompt(1), PrefixAwarePolicy()
    candidates = [worker("gpu"), worker("host"), worker("miss")]
    matches, host = {"gpu": 60, "host": 60, "miss": 0}, {"gpu": 0, "host": 60, "miss": 0}
    assert policy.pick_prefill(hashes, candidates, matches, None, host).worker_id == "gpu"
    decision = policy.pick_prefill(hashes, candidates[1:], matches, None, host)
    assert (decision.worker_id, decision.reason, decision.num_cached_tokens) == ("host", "prefix_hit", 60 * BLOCK_SIZE)
    # Some queueing on the GPU-hit worker is worth more than the copy back: the host hit wins.
    busy = [worker("gpu", num_tokens_in_flight=400), worker("host"), worker("miss")]
    assert policy.pick_prefill(hashes, busy, matches, None, host).worker_id == "host"
    # Without tier information a host match would count as a GPU one; the index never says so.
    assert policy.pick_prefill(hashes, busy, {"gpu": 60, "host": 0, "miss": 0}, None, None).worker_id == "gpu"


@run_async
async def test_the_directory_follows_prefixes_through_both_tiers():
    cp = MemoryControlPlane()
    directory = WorkerDirectory(cp, BLOCK_SIZE)
    hashes = prompt(2, 8)
    for w in (worker("p1"), worker("p2", host_kv_blocks=0), worker("p3")):
        await cp.register(w.info, ttl_seconds=30, load=w.load)
    # p1: head on the GPU, tail on the host, the last block back on the GPU (restored).
    await cp.publish_kv_events("p1", [KVEvent.stored(hashes[:3]), KVEvent.stored(hashes[3:7], KVTier.HOST), KVEvent.stored(hashes[7:])])
    # p2 has no host tier: host events of its id would never be asked about.
    await cp.publish_kv_events("p2", [KVEvent.stored(hashes[:2]), KVEvent.stored(hashes[2:], KVTier.HOST)])
    # p3: the whole prefix on its host tier.
    await cp.publish_kv_events("p3", [KVEvent.stored(hashes, KVTier.HOST)])
    live = await directory.live("prefill")
    tiers = await directory.match_prefix_tiers(hashes, live)
    assert tiers.num_matched == {"p1": 8, "p2": 2, "p3": 8}
    assert tiers.num_host == {"p1": 4, "p2": 0, "p3": 8}
    decision = PrefixAwarePolicy().pick_prefill(hashes, live, tiers.num_matched, None, tiers.num_host)
    assert decision.worker_id == "p1" and decision.num_cached_tokens == 8 * BLOCK_SIZE


@run_async
async def test_sleeping_workers_are_not_candidates():
    cp = MemoryControlPlane()
    directory = WorkerDirectory(cp, BLOCK_SIZE)
    await cp.register(worker("p1").info, ttl_seconds=30)
    await cp.register(worker("p2").info, ttl_seconds=30, load=WorkerLoad(sleeping=True))
    assert [w.info.worker_id for w in await directory.live("prefill")] == ["p1"]
