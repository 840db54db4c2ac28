"""RouterIndex over a real in-memory control plane: predictions, in-flight load, degradation,
and a simulated pair of prefill workers that shows what prefix-aware routing saves."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random

from splitserve.controlplane import ControlPlaneUnavailable, KVEvent, MemoryControlPlane, WorkerInfo, WorkerLoad
from splitserve.controlplane.testing import run_async
from splitserve.engine.prefix_hash import hash_request_tokens
from splitserve.services.router.index import RouterIndex
from splitserve.services.router.routing import LeastLoadedPolicy, PrefixAwarePolicy, RoundRobinPolicy, RoutingPolicy

BLOCK_SIZE = 16


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlakyControlPlane(MemoryControlPlane):
    """An in-memory store that can be switched off, counting the calls routers make."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.down = False
        self.num_calls = collections.Counter()

    async def live_workers(self, role=None):
        self._call("live_workers")
        return await super().live_workers(role)

    async def match_prefix(self, block_hashes, worker_ids):
        self._call("match_prefix")
        return await super().match_prefix(block_hashes, worker_ids)

    def _call(self, name: str) -> None:
        self.num_calls[name] += 1
        if self.down:
            raise ControlPlaneUnavailable("test store is down")


def tokens(seed: int, num_blocks: int) -> list[int]:
    return [seed * 1_000_000 + i for i in range(num_blocks * BLOCK_SIZE)]


async def two_prefill_workers(cp: MemoryControlPlane) -> None:
    for worker_id in ("p0", "p1"):
        await cp.register(WorkerInfo(worker_id, "prefill", f"{worker_id}:1", BLOCK_SIZE), ttl_seconds=30)


@run_async
async def test_a_routed_prompt_counts_as_cached_there_until_predictions_expire():
    clock = FakeClock()
    cp = MemoryControlPlane(clock)
    await two_prefill_workers(cp)
    index = RouterIndex(cp, predict_seconds=2.0, clock=clock)
    hashes = hash_request_tokens(tokens(1, 8), BLOCK_SIZE)
    with index.track("p1", hashes, num_tokens=8 * BLOCK_SIZE):
        pass
    # The same prefix again, before p1's stored events: p1 is predicted to hold it.
    longer = hash_request_tokens(tokens(1, 12), BLOCK_SIZE)
    assert await index.match_prefix(longer, ["p0", "p1"]) == {"p0": 0, "p1": 8}
    decision = PrefixAwarePolicy().pick_prefill(longer, await index.candidates("prefill"), await index.match_prefix(longer, ["p0", "p1"]))
    assert (decision.worker_id, decision.reason) == ("p1", "prefix_hit")

    clock.now += 2.5
    assert await index.match_prefix(longer, ["p0", "p1"]) == {"p0": 0, "p1": 0}
    assert index.num_predicted_blocks == 0
    # Real events take over where predictions end.
    await cp.publish_kv_events("p0", [KVEvent.stored(hashes[:5])])
    assert await index.match_prefix(longer, ["p0", "p1"]) == {"p0": 5, "p1": 0}


@run_async
async def test_requests_in_flight_raise_the_load_the_policy_sees():
    clock = FakeClock()
    cp = MemoryControlPlane(clock)
    for worker_id in ("d0", "d1"):
        load = WorkerLoad(num_running=1, num_free_blocks=90, num_total_blocks=100)
        await cp.register(WorkerInfo(worker_id, "decode", f"{worker_id}:1", BLOCK_SIZE), ttl_seconds=30, load=load)
    index = RouterIndex(cp, clock=clock)
    with index.track("d0", num_blocks=50), index.track("d0", num_tokens=300):
        d0, d1 = await index.candidates("decode")
        assert d0.load == WorkerLoad(num_waiting=1, num_running=1, num_tokens_in_flight=300, num_free_blocks=50, num_total_blocks=100)
        assert d1.load.num_free_blocks == 90
        assert PrefixAwarePolicy().pick_decode([d0, d1], num_blocks_needed=8).worker_id == "d1"
    d0, _ = await index.candidates("decode")
    assert d0.load == WorkerLoad(num_running=1, num_free_blocks=90, num_total_blocks=100)


@run_async
async def test_worker_list_is_reused_within_the_refresh_window():
    clock = FakeClock()
    cp = FlakyControlPlane(clock)
    await two_prefill_workers(cp)
    index = RouterIndex(cp, refresh_seconds=0.5, clock=clock)
    for _ in range(3):
        assert len(await index.candidates("prefill")) == 2
    clock.now += 0.6
    await index.candidates("prefill")
    assert cp.num_calls["live_workers"] == 2


@run_async
async def test_a_lost_control_plane_means_load_only_routing_one_warning_and_no_hammering(caplog):
    clock = FakeClock()
    cp = FlakyControlPlane(clock)
    await cp.register(WorkerInfo("p0", "prefill", "p0:1", BLOCK_SIZE), ttl_seconds=30, load=WorkerLoad(num_waiting=5))
    await cp.register(WorkerInfo("p1", "prefill", "p1:1", BLOCK_SIZE), ttl_seconds=30)
    index = RouterIndex(cp, refresh_seconds=0.0, retry_seconds=1.0, clock=clock)
    hashes = hash_request_tokens(tokens(2, 64), BLOCK_SIZE)
    await cp.publish_kv_events("p0", [KVEvent.stored(hashes)])
    assert len(await index.candidates("prefill")) == 2
    assert (await index.match_prefix(hashes, ["p0", "p1"])) == {"p0": 64, "p1": 0}

    cp.down = True
    cp.num_calls.clear()
    with caplog.at_level(logging.WARNING, logger="splitserve.services.router.index"):
        for _ in range(5):
            candidates = await index.candidates("prefill")
            matches = await index.match_prefix(hashes, [w.info.worker_id for w in candidates])
            decision = PrefixAwarePolicy().pick_prefill(hashes, candidates, matches)
            assert (decision.worker_id, decision.reason) == ("p1", "load_only")
        assert not index.available
        # One call failed; for the next retry_seconds nobody waits on the store.
        assert sum(cp.num_calls.values()) == 1
        cp.down = False
        clock.now += 1.5
        assert await index.match_prefix(hashes, ["p0", "p1"]) == {"p0": 64, "p1": 0}
        assert index.available
    warnings = [r.message for r in caplog.records]
    assert len(warnings) == 2 and "load only" in warnings[0] and "back" in warnings[1]


class SimulatedPrefillWorker:
    """A prefix cache of ``capacity`` blocks with LRU eviction that publishes its KV events."""

    def __init__(self, worker_id: str, capacity: int) -> None:
        self.worker_id = worker_id
        self.capacity = capacity
        self.cache: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.num_prompt_tokens_computed = 0

    def prefill(self, hashes: list[bytes]) -> list[KVEvent]:
        num_hit = 0
        while num_hit < len(hashes) and hashes[num_hit] in self.cache:
            num_hit += 1
        self.num_prompt_tokens_computed += (len(hashes) - num_hit) * BLOCK_SIZE
        stored = [h for h in hashes if h not in self.cache]
        for h in hashes:
            self.cache[h] = None
            self.cache.move_to_end(h)
        evicted = []
        while len(self.cache) > self.capacity:
            evicted.append(self.cache.popitem(last=False)[0])
        return [KVEvent.stored(stored), *([KVEvent.removed(evicted)] if evicted else [])]


async def simulate(policy: RoutingPolicy, capacity: int = 200) -> int:
    """Shared-prefix traffic (4 system prompts of 1024 tokens in a seeded random order, distinct
    128-token suffixes) in waves of 4 concurrent requests over 2 workers that each cache
    about two system prompts' worth."""
    order = random.Random(0)
    cp = MemoryControlPlane()
    await two_prefill_workers(cp)
    workers = {w: SimulatedPrefillWorker(w, capacity) for w in ("p0", "p1")}
    index = RouterIndex(cp)
    for wave in range(20):
        routed = []
        with contextlib.ExitStack() as in_flight:
            for i in range(4):
                prefix = order.randrange(4)
                hashes = hash_request_tokens(tokens(prefix, 64) + tokens(1000 + wave * 4 + i, 8), BLOCK_SIZE)
                candidates = await index.candidates("prefill")
                decision = policy.pick_prefill(hashes, candidates, await index.match_prefix(hashes, ["p0", "p1"]))
                in_flight.enter_context(index.track(decision.worker_id, hashes, len(hashes) * BLOCK_SIZE - decision.num_cached_tokens))
                routed.append((decision.worker_id, hashes))
        for worker_id, hashes in routed:
            await cp.publish_kv_events(worker_id, workers[worker_id].prefill(hashes))
    return sum(w.num_prompt_tokens_computed for w in workers.values())


@run_async
async def test_prefix_aware_routing_computes_far_fewer_prefill_tokens_than_round_robin():
    prefix_aware = await simulate(PrefixAwarePolicy())
    round_robin = await simulate(RoundRobinPolicy())
    num_suffix_tokens = 80 * 8 * BLOCK_SIZE
    # Prefix-aware: each system prompt is computed once, then only suffixes;
    # round robin makes both workers cache all four, which do not fit.
    assert prefix_aware == 4 * 64 * BLOCK_SIZE + num_suffix_tokens
    assert round_robin > 3 * prefix_aware
    assert await simulate(LeastLoadedPolicy()) > 3 * prefix_aware


class SlowListingControlPlane(MemoryControlPlane):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.release = asyncio.Event()

    async def live_workers(self, role=None):
        await self.release.wait()  # e.g. reaping a dead worker's many index entries
        return await super().live_workers(role)


@run_async
async def test_requests_do_not_wait_for_a_slow_refresh_once_a_list_exists():
    clock = FakeClock()
    cp = SlowListingControlPlane(clock)
    await two_prefill_workers(cp)
    index = RouterIndex(cp, refresh_seconds=0.5, clock=clock)
    cp.release.set()
    assert len(await index.candidates("prefill")) == 2
    cp.release.clear()
    await cp.register(WorkerInfo("p2", "prefill", "p2:1", BLOCK_SIZE), ttl_seconds=30)
    clock.now += 1
    refreshing = asyncio.create_task(index.candidates("prefill"))
    await asyncio.sleep(0)
    assert len(await asyncio.wait_for(index.candidates("prefill"), 1)) == 2  # the last list, at once
    cp.release.set()
    assert len(await refreshing) == 3
