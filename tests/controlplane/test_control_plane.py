"""Behaviour every store shares: memory, Redis, and the router-hosted store over gRPC."""
from __future__ import annotations

import asyncio

import pytest

from splitserve.controlplane import KVEvent, WorkerAgent, WorkerInfo, WorkerLoad
from splitserve.controlplane.agent import batched_events
from splitserve.controlplane.types import BLOCK_HASH_BYTES
from splitserve.controlplane.testing import run_async
from splitserve.engine.prefix_hash import hash_request_tokens
from splitserve.services.router.routing import PrefixAwarePolicy

BLOCK_SIZE = 16


def prefill(worker_id: str) -> WorkerInfo:
    return WorkerInfo(worker_id, "prefill", f"127.0.0.1:{5000 + int(worker_id[-1])}", BLOCK_SIZE)


def prompt_hashes(seed: int, num_blocks: int) -> list[bytes]:
    return hash_request_tokens([seed * 100_000 + i for i in range(num_blocks * BLOCK_SIZE)], BLOCK_SIZE)


@run_async
async def test_register_lists_workers_by_role_with_their_load(backend):
    async with backend:
        cp = await backend.client()
        await cp.register(prefill("p1"), ttl_seconds=10, load=WorkerLoad(1, 2, 300, 40, 50))
        await cp.register(WorkerInfo("d1", "decode", "127.0.0.1:6001", BLOCK_SIZE, tp_size=2, model="m"), ttl_seconds=10)
        await cp.register(prefill("p0"), ttl_seconds=10)

        assert [w.info.worker_id for w in await cp.live_workers()] == ["d1", "p0", "p1"]
        (decode,) = await cp.live_workers("decode")
        assert decode.info == WorkerInfo("d1", "decode", "127.0.0.1:6001", BLOCK_SIZE, 2, "m")
        info, load = (await cp.live_workers("prefill"))[1]
        assert (info, load) == (prefill("p1"), WorkerLoad(1, 2, 300, 40, 50))

        assert await cp.heartbeat("p1", WorkerLoad(0, 1, 16, 45, 50))
        assert (await cp.live_workers("prefill"))[1].load == WorkerLoad(0, 1, 16, 45, 50)
        assert not await cp.heartbeat("nobody", WorkerLoad())


@run_async
async def test_events_update_the_longest_prefix_per_worker(backend):
    async with backend:
        cp = await backend.client()
        for worker_id in ("p0", "p1", "p2"):
            await cp.register(prefill(worker_id), ttl_seconds=10)
        hashes = prompt_hashes(1, 8)
        await cp.publish_kv_events("p0", [KVEvent.stored(hashes)])
        await cp.publish_kv_events("p1", [KVEvent.stored(hashes[:3]), KVEvent.stored(hashes[4:])])  # a hole at 3
        assert await cp.match_prefix(hashes, ["p0", "p1", "p2"]) == {"p0": 8, "p1": 3, "p2": 0}

        await cp.publish_kv_events("p0", [KVEvent.removed(hashes[5:6])])
        assert await cp.match_prefix(hashes, ["p0", "p1"]) == {"p0": 5, "p1": 3}
        # A longer prompt with the same prefix: matching ends where the cache does.
        longer = hash_request_tokens([100_000 + i for i in range(12 * BLOCK_SIZE)], BLOCK_SIZE)
        assert longer[:8] == hashes
        assert await cp.match_prefix(longer, ["p0", "p1"]) == {"p0": 5, "p1": 3}

        await cp.publish_kv_events("p0", [KVEvent.cleared(), KVEvent.stored(hashes[:2])])
        assert await cp.match_prefix(hashes, ["p0", "p1"]) == {"p0": 2, "p1": 3}
        await cp.publish_kv_events("p1", [KVEvent.removed(hashes), KVEvent.removed(hashes)])  # idempotent
        assert await cp.match_prefix(hashes, ["p0", "p1"]) == {"p0": 2, "p1": 0}


@run_async
async def test_match_stops_at_the_first_block_nobody_holds(backend):
    async with backend:
        cp = await backend.client()
        await cp.register(prefill("p0"), ttl_seconds=10)
        hashes = prompt_hashes(2, 6)
        # Block 0 missing: blocks further on count for nothing, even where held.
        await cp.publish_kv_events("p0", [KVEvent.stored(hashes[1:])])
        assert await cp.match_prefix(hashes, ["p0"]) == {"p0": 0}
        assert await cp.match_prefix(hashes, []) == {}
        assert await cp.match_prefix([], ["p0"]) == {"p0": 0}
        assert await cp.match_prefix(prompt_hashes(3, 4), ["p0", "ghost"]) == {"p0": 0, "ghost": 0}


@run_async
async def test_lapsed_ttl_drops_the_worker_and_its_index_entries(backend):
    async with backend:
        cp = await backend.client()
        await cp.register(prefill("p0"), ttl_seconds=0.3)
        await cp.register(prefill("p1"), ttl_seconds=10)
        hashes = prompt_hashes(4, 4)
        for worker_id in ("p0", "p1"):
            await cp.publish_kv_events(worker_id, [KVEvent.stored(hashes)])

        await asyncio.sleep(0.5)
        assert [w.info.worker_id for w in await cp.live_workers()] == ["p1"]
        # Asked about explicitly, the lapsed worker holds nothing any more.
        assert await cp.match_prefix(hashes, ["p0", "p1"]) == {"p0": 0, "p1": 4}
        assert not await cp.heartbeat("p0", WorkerLoad())

        # Registering again is a fresh start: nothing comes back by itself.
        await cp.register(prefill("p0"), ttl_seconds=10)
        assert await cp.match_prefix(hashes, ["p0"]) == {"p0": 0}


@run_async
async def test_heartbeats_keep_a_worker_past_its_ttl(backend):
    async with backend:
        cp = await backend.client()
        await cp.register(prefill("p0"), ttl_seconds=0.4)
        for _ in range(5):
            await asyncio.sleep(0.15)
            assert await cp.heartbeat("p0", WorkerLoad(num_waiting=1))
        assert [w.info.worker_id for w in await cp.live_workers()] == ["p0"]


@run_async
async def test_register_again_and_deregister_drop_old_entries(backend):
    async with backend:
        cp = await backend.client()
        hashes = prompt_hashes(5, 4)
        await cp.register(prefill("p0"), ttl_seconds=10)
        await cp.publish_kv_events("p0", [KVEvent.stored(hashes)])
        await cp.register(prefill("p0"), ttl_seconds=10)  # the worker restarted with an empty cache
        assert await cp.match_prefix(hashes, ["p0"]) == {"p0": 0}

        await cp.publish_kv_events("p0", [KVEvent.stored(hashes)])
        await cp.deregister("p0")
        assert await cp.live_workers() == []
        assert await cp.match_prefix(hashes, ["p0"]) == {"p0": 0}


@run_async
async def test_two_router_replicas_share_one_view_and_route_alike(backend):
    async with backend:
        worker = await backend.client()
        router_a, router_b = await backend.client(), await backend.client()
        for worker_id in ("p0", "p1", "p2", "p3"):
            await worker.register(prefill(worker_id), ttl_seconds=10, load=WorkerLoad(num_free_blocks=100, num_total_blocks=100))
        shared = prompt_hashes(6, 10)
        await worker.publish_kv_events("p2", [KVEvent.stored(shared[:8])])
        await worker.publish_kv_events("p1", [KVEvent.stored(shared[:3])])
        policy_a, policy_b = PrefixAwarePolicy(), PrefixAwarePolicy()

        decisions = []
        for router, policy in ((router_a, policy_a), (router_b, policy_b)):
            candidates = await router.live_workers("prefill")
            matches = await router.match_prefix(shared, [w.info.worker_id for w in candidates])
            decisions.append(policy.pick_prefill(shared, candidates, matches))
        assert decisions[0] == decisions[1]
        assert (decisions[0].worker_id, decisions[0].reason, decisions[0].num_cached_tokens) == ("p2", "prefix_hit", 8 * BLOCK_SIZE)

        # With nothing cached either, ties still resolve the same way in both.
        fresh = prompt_hashes(7, 10)
        picks = set()
        for router, policy in ((router_a, policy_a), (router_b, policy_b)):
            candidates = await router.live_workers("prefill")
            picks.add(policy.pick_prefill(fresh, candidates, await router.match_prefix(fresh, ["p0", "p1", "p2", "p3"])))
        assert len(picks) == 1


@run_async
async def test_a_new_client_sees_the_index_written_before_it(backend):
    if backend.kind == "memory":
        pytest.skip("one in-process store: a new client is the same object")
    async with backend:
        first = await backend.client()
        await first.register(prefill("p0"), ttl_seconds=10)
        hashes = prompt_hashes(8, 6)
        await first.publish_kv_events("p0", [KVEvent.stored(hashes)])
        await first.close()

        restarted = await backend.client()
        assert [w.info.worker_id for w in await restarted.live_workers()] == ["p0"]
        assert await restarted.match_prefix(hashes, ["p0"]) == {"p0": 6}


@run_async
async def test_worker_agent_registers_publishes_and_resyncs(backend):
    async with backend:
        cp, router = await backend.client(), await backend.client()
        cached: list[bytes] = prompt_hashes(9, 5)
        agent = WorkerAgent(cp, prefill("p0"), lambda: WorkerLoad(num_running=1), lambda: list(cached), ttl_seconds=0.3)
        await agent.start()
        try:
            assert agent.in_sync
            assert await router.match_prefix(cached, ["p0"]) == {"p0": 5}
            more = prompt_hashes(10, 2)
            cached += more
            await agent.publish([KVEvent.stored(more)])
            assert await router.match_prefix(more, ["p0"]) == {"p0": 2}

            # The store forgets the worker (a restarted embedded store, a lapsed TTL):
            # the next heartbeat finds out, and the agent republishes everything.
            await router.deregister("p0")
            for _ in range(50):  # heartbeats come every 0.1 s; give a loaded machine 5 s
                await asyncio.sleep(0.1)
                if await router.live_workers() and await router.match_prefix(more, ["p0"]) == {"p0": 2}:
                    break
            assert [w.info.worker_id for w in await router.live_workers()] == ["p0"]
            assert await router.match_prefix(cached[:5], ["p0"]) == {"p0": 5}
            assert await router.match_prefix(more, ["p0"]) == {"p0": 2}
            assert (await router.live_workers())[0].load == WorkerLoad(num_running=1)
        finally:
            await agent.stop()
        assert await router.live_workers() == []


@run_async
async def test_a_storm_of_small_publishes_goes_out_in_few_calls_and_in_order(backend):
    """A busy engine publishes after every step; those publishes must not each take a turn at
    the store (they would queue ahead of the heartbeats faster than the store answers)."""
    async with backend:
        cp, router = await backend.client(), await backend.client()
        agent = WorkerAgent(cp, prefill("p0"), lambda: WorkerLoad(), lambda: [], ttl_seconds=5)
        await agent.start()
        calls = 0
        real_publish = cp.publish_kv_events

        async def counted(worker_id, events):
            nonlocal calls
            calls += 1
            await real_publish(worker_id, events)

        cp.publish_kv_events = counted
        try:
            chain = prompt_hashes(11, 300)
            await asyncio.gather(*(agent.publish([KVEvent.stored([h])]) for h in chain))
            assert calls <= 2, calls
            assert await router.match_prefix(chain, ["p0"]) == {"p0": 300}
            await agent.publish([KVEvent.removed(chain[150:])])  # and later events still follow
            assert await router.match_prefix(chain, ["p0"]) == {"p0": 150}
        finally:
            await agent.stop()


def test_events_and_infos_are_checked_at_the_boundary():
    with pytest.raises(ValueError, match="16 bytes"):
        KVEvent.stored([b"short"])
    with pytest.raises(ValueError, match="no block hashes"):
        KVEvent("cleared", (b"x" * 16,))
    with pytest.raises(ValueError, match="role"):
        WorkerInfo("w", "router", "h:1", 16)
    with pytest.raises(ValueError, match="num_free_blocks"):
        WorkerLoad(num_free_blocks=5, num_total_blocks=4)
    assert KVEvent("stored", [b"x" * 16]).block_hashes == (b"x" * 16,)


def test_large_publishes_are_split_in_order():
    hashes = [bytes([i]) * 16 for i in range(10)]
    events = [KVEvent.stored(hashes[:3]), KVEvent.cleared(), KVEvent.removed(hashes[3:]), KVEvent.stored([])]
    batches = list(batched_events(events, 4))
    assert [sum(len(e.block_hashes) for e in b) for b in batches] == [4, 4, 2]
    flat = [(e.kind, h) for b in batches for e in b for h in (e.block_hashes or [None])]
    assert flat == [("stored", h) for h in hashes[:3]] + [("cleared", None)] + [("removed", h) for h in hashes[3:]]


def test_a_workers_kv_events_group_into_runs_of_one_kind_in_order():
    from splitserve.services.worker import group_kv_events

    a, b, c, d = (bytes([i]) * BLOCK_HASH_BYTES for i in range(4))
    events = [("stored", a), ("stored", b), ("removed", c), ("stored", d)]
    assert group_kv_events(events) == [KVEvent.stored([a, b]), KVEvent.removed([c]), KVEvent.stored([d])]
    assert group_kv_events([]) == []
    many = [("stored", bytes([i % 256, i // 256]) * (BLOCK_HASH_BYTES // 2)) for i in range(4096)]
    assert group_kv_events(many) == [KVEvent.stored([h for _, h in many])]
