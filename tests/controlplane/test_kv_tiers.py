"""The host KV tier in the block index, in every store: indexed apart from the GPU cache,
cleared, deregistered and reaped with its worker, and carried through events and snapshots."""
from __future__ import annotations

import asyncio
import dataclasses

from splitserve.services.router.host_matches import match_tiers

from splitserve.controlplane import KVEvent, WorkerAgent, WorkerInfo, WorkerLoad
from splitserve.controlplane.convert import (
    event_from_pb,
    event_to_pb,
    info_from_pb,
    info_to_pb,
    load_from_pb,
    load_to_pb,
)
from splitserve.controlplane.testing import run_async
from splitserve.controlplane.types import KVTier, host_index_id
from splitserve.engine.prefix_hash import hash_request_tokens

BLOCK_SIZE = 16


def prefill(worker_id: str) -> WorkerInfo:
    return WorkerInfo(worker_id, "prefill", f"127.0.0.1:{5000 + int(worker_id[-1])}", BLOCK_SIZE, host_kv_blocks=64)


def hashes(seed: int, num_blocks: int) -> list[bytes]:
    return hash_request_tokens([seed * 100_000 + i for i in range(num_blocks * BLOCK_SIZE)], BLOCK_SIZE)


@run_async
async def test_host_blocks_are_indexed_apart_and_cleared_with_their_worker(backend):
    async with backend:
        cp = await backend.client()
        await cp.register(prefill("p0"), ttl_seconds=10)
        await cp.register(prefill("p1"), ttl_seconds=10)
        prompt = hashes(1, 6)
        # p0: blocks 0-1 on the GPU, 2-4 spilled to the host; p1: blocks 0-5 on the GPU.
        await cp.publish_kv_events("p0", [KVEvent.stored(prompt[:5]), KVEvent.removed(prompt[2:5]), KVEvent.stored(prompt[2:5], KVTier.HOST)])
        await cp.publish_kv_events("p1", [KVEvent.stored(prompt)])
        h0 = host_index_id("p0")
        assert await cp.match_prefix(prompt, ["p0", "p1", h0]) == {"p0": 2, "p1": 6, h0: 0}
        assert await cp.match_prefix(prompt[2:], [h0]) == {h0: 3}
        assert [w.info.worker_id for w in await cp.live_workers()] == ["p0", "p1"]  # the host index is no worker

        tiers = await match_tiers(cp.match_prefix, prompt, {"p0": 2, "p1": 6}, {"p0", "p1"})
        assert tiers.num_matched == {"p0": 5, "p1": 6} and tiers.num_host == {"p0": 3, "p1": 0}

        await cp.publish_kv_events("p0", [KVEvent.removed(prompt[3:4], KVTier.HOST)])
        assert await cp.match_prefix(prompt[2:], [h0]) == {h0: 1}
        await cp.publish_kv_events("p0", [KVEvent.cleared()])  # empties both tiers
        assert await cp.match_prefix(prompt[2:], [h0, "p0"]) == {h0: 0, "p0": 0}

        await cp.publish_kv_events("p1", [KVEvent.stored(prompt[:2], KVTier.HOST)])
        await cp.deregister("p1")
        assert await cp.match_prefix(prompt, [host_index_id("p1")]) == {host_index_id("p1"): 0}


@run_async
async def test_a_lapsed_worker_is_reaped_with_its_host_tier(backend):
    async with backend:
        cp = await backend.client()
        await cp.register(prefill("p0"), ttl_seconds=0.3)
        prompt = hashes(2, 3)
        await cp.publish_kv_events("p0", [KVEvent.stored(prompt, KVTier.HOST)])
        assert await cp.match_prefix(prompt, [host_index_id("p0")]) == {host_index_id("p0"): 3}
        await asyncio.sleep(0.5)
        assert await cp.live_workers() == []
        assert await cp.match_prefix(prompt, [host_index_id("p0")]) == {host_index_id("p0"): 0}


@run_async
async def test_a_resync_republishes_both_tiers(backend):
    async with backend:
        cp = await backend.client()
        gpu, host = hashes(3, 2), hashes(4, 3)
        agent = WorkerAgent(cp, prefill("p0"), WorkerLoad, lambda: gpu, ttl_seconds=5, get_host_block_hashes=lambda: host)
        await agent.start()
        try:
            assert await cp.match_prefix(gpu, ["p0"]) == {"p0": 2}
            assert await cp.match_prefix(host, ["p0", host_index_id("p0")]) == {"p0": 0, host_index_id("p0"): 3}
        finally:
            await agent.stop()


def test_tiers_and_sleep_cross_the_proto_boundary():
    for event in (KVEvent.stored(hashes(5, 2), KVTier.HOST), KVEvent.removed(hashes(5, 1)), KVEvent.cleared()):
        assert event_from_pb(event_to_pb(event)) == event
    info = prefill("p3")
    assert info_from_pb(info_to_pb(info)) == info and info.host_kv_blocks == 64
    load = WorkerLoad(num_free_blocks=3, num_total_blocks=8, sleeping=True)
    assert load_from_pb(load_to_pb(load)) == load
    assert dataclasses.replace(load, sleeping=False) != load
