"""What only the Redis store does: fail fast and clearly, reap in Redis, log events, recover."""
from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import time

import pytest
import redis

from splitserve.controlplane import (
    ControlPlaneUnavailable,
    KVEvent,
    MemoryControlPlane,
    RedisControlPlane,
    WorkerAgent,
    WorkerInfo,
    WorkerLoad,
    connect,
)
from splitserve.controlplane.redis_store import CLEAR_BATCH_SIZE, redact_url
from splitserve.controlplane.testing import free_port, run_async, start_redis_server
from splitserve.engine.prefix_hash import hash_request_tokens
from splitserve.services.router.index import RouterIndex
from splitserve.services.router.routing import PrefixAwarePolicy

BLOCK_SIZE = 16
# Failing "fast" means within the client's socket timeout (0.5 s) plus slack for
# a loaded CI machine; a default redis-py client would retry with backoff for longer.
FAST_SECONDS = 2.0


def prefill(worker_id: str) -> WorkerInfo:
    return WorkerInfo(worker_id, "prefill", f"127.0.0.1:{5000 + int(worker_id[-1])}", BLOCK_SIZE)


def hashes_of(seed: int, num_blocks: int) -> list[bytes]:
    return hash_request_tokens([seed * 100_000 + i for i in range(num_blocks * BLOCK_SIZE)], BLOCK_SIZE)


@run_async
async def test_redis_unavailable_at_start_is_a_clear_error():
    url = f"redis://127.0.0.1:{free_port()}/0"
    start = time.monotonic()
    with pytest.raises(ControlPlaneUnavailable, match=f"Redis at {url} is unavailable"):
        await connect(url)
    assert time.monotonic() - start < FAST_SECONDS


def test_urls_in_errors_hide_the_password():
    assert redact_url("redis://user:s3cret@redis:6379/0") == "redis://user:***@redis:6379/0"
    assert redact_url("redis://:s3cret@redis:6379") == "redis://:***@redis:6379"
    assert redact_url("redis://redis:6379") == "redis://redis:6379"


@run_async
async def test_unknown_control_plane_urls_are_refused():
    with pytest.raises(ValueError, match="expected redis://"):
        await connect("http://localhost:1")
    assert isinstance(await connect("embedded"), MemoryControlPlane)


@run_async
async def test_redis_killed_mid_run_fails_fast_and_routing_goes_on_by_load(own_redis_server, caplog):
    cp = await RedisControlPlane.connect(own_redis_server.url)
    for worker_id, num_waiting in (("p0", 3), ("p1", 0)):
        await cp.register(prefill(worker_id), ttl_seconds=10, load=WorkerLoad(num_waiting=num_waiting))
    hashes = hashes_of(1, 32)  # 512 tokens: p0's queue (3 x 64 tokens) is worth its cache
    await cp.publish_kv_events("p0", [KVEvent.stored(hashes)])
    index = RouterIndex(cp, refresh_seconds=0)  # asks the store every time
    policy = PrefixAwarePolicy()
    candidates = await index.candidates("prefill")
    decision = policy.pick_prefill(hashes, candidates, await index.match_prefix(hashes, ["p0", "p1"]))
    assert (decision.worker_id, decision.reason) == ("p0", "prefix_hit")

    own_redis_server.kill()
    calls = {
        "register": lambda: cp.register(prefill("p2"), ttl_seconds=10),
        "heartbeat": lambda: cp.heartbeat("p0", WorkerLoad()),
        "publish_kv_events": lambda: cp.publish_kv_events("p0", [KVEvent.stored(hashes_of(2, 1))]),
        "live_workers": lambda: cp.live_workers(),
        "match_prefix": lambda: cp.match_prefix(hashes, ["p0", "p1"]),
        "deregister": lambda: cp.deregister("p0"),
    }
    for name, call in calls.items():
        start = time.monotonic()
        with pytest.raises(ControlPlaneUnavailable, match=own_redis_server.url):
            await call()
        assert time.monotonic() - start < FAST_SECONDS, name

    # The router keeps routing: last known workers, by load, with one warning.
    with caplog.at_level(logging.WARNING, logger="splitserve.services.router.index"):
        candidates = await index.candidates("prefill")
        matches = await index.match_prefix(hashes, [w.info.worker_id for w in candidates])
        decision = policy.pick_prefill(hashes, candidates, matches)
    assert matches is None and not index.available
    assert (decision.worker_id, decision.reason) == ("p1", "load_only")
    assert [r.message for r in caplog.records if "load only" in r.message] != []
    await cp.close()


@run_async
async def test_a_hung_redis_times_out_instead_of_stalling(own_redis_server):
    cp = await RedisControlPlane.connect(own_redis_server.url, timeout_seconds=0.3)
    await cp.register(prefill("p0"), ttl_seconds=10)
    os.kill(own_redis_server.process.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(ControlPlaneUnavailable):
            await cp.match_prefix(hashes_of(3, 4), ["p0"])
        assert time.monotonic() - start < FAST_SECONDS
    finally:
        os.kill(own_redis_server.process.pid, signal.SIGCONT)
    await cp.close()


@run_async
async def test_after_a_redis_restart_the_agent_republishes_and_hits_return(own_redis_server, tmp_path):
    worker_cp = await RedisControlPlane.connect(own_redis_server.url)
    cached = hashes_of(4, 6)
    agent = WorkerAgent(worker_cp, prefill("p0"), lambda: WorkerLoad(), lambda: cached, ttl_seconds=0.3)
    await agent.start()
    own_redis_server.kill()  # and with it every key: persistence is off
    restarted = start_redis_server(tmp_path / "again", port=own_redis_server.port)
    try:
        router_cp = await RedisControlPlane.connect(restarted.url)
        deadline = time.monotonic() + 5
        while await router_cp.match_prefix(cached, ["p0"]) != {"p0": 6}:
            assert time.monotonic() < deadline, "the agent never resynced"
            await asyncio.sleep(0.05)
        assert agent.in_sync
        await agent.stop()
        await router_cp.close()
        await worker_cp.close()
    finally:
        restarted.stop()


@run_async
async def test_reaping_a_lapsed_worker_leaves_no_keys_behind(redis_server):
    redis.Redis.from_url(redis_server.url).flushall()
    cp = await RedisControlPlane.connect(redis_server.url, namespace="reap")
    await cp.register(prefill("p0"), ttl_seconds=0.2)
    await cp.register(prefill("p1"), ttl_seconds=10)
    many = hashes_of(5, 2 * CLEAR_BATCH_SIZE + 7)  # several batches of the clear script
    await cp.publish_kv_events("p0", [KVEvent.stored(many)])
    await cp.publish_kv_events("p1", [KVEvent.stored(many[:3])])
    await asyncio.sleep(0.4)

    assert [w.info.worker_id for w in await cp.live_workers()] == ["p1"]
    sync = redis.Redis.from_url(redis_server.url)
    assert sync.smembers("reap:workers") == {b"p1"}
    assert not sync.exists("reap:worker_blocks:p0")
    assert len(list(sync.scan_iter(b"reap:block:*"))) == 3
    assert await cp.match_prefix(many, ["p0", "p1"]) == {"p0": 0, "p1": 3}
    await cp.close()


@run_async
async def test_a_reaper_leaves_a_worker_that_registered_again_alone(redis_server):
    redis.Redis.from_url(redis_server.url).flushall()
    cp = await RedisControlPlane.connect(redis_server.url, namespace="race")
    hashes = hashes_of(6, 4)
    await cp.register(prefill("p0"), ttl_seconds=10)
    await cp.publish_kv_events("p0", [KVEvent.stored(hashes)])
    # A reaper that saw the registration missing a moment ago must not touch
    # the entries of the registration that now exists.
    assert await cp._clear_blocks("p0", mode="lapsed") is False
    assert await cp.match_prefix(hashes, ["p0"]) == {"p0": 4}
    await cp.close()


@run_async
async def test_the_event_stream_replays_into_the_same_index(redis_server):
    redis.Redis.from_url(redis_server.url).flushall()
    cp = await RedisControlPlane.connect(redis_server.url, namespace="log")
    a, b = hashes_of(7, 6), hashes_of(8, 6)
    await cp.register(prefill("p0"), ttl_seconds=10)
    await cp.register(prefill("p1"), ttl_seconds=10)
    await cp.publish_kv_events("p0", [KVEvent.stored(a), KVEvent.removed(a[4:])])
    await cp.publish_kv_events("p1", [KVEvent.stored(b), KVEvent.cleared(), KVEvent.stored(b[:2] + a[:1])])

    replayed = MemoryControlPlane()
    last_event_id, num_events = "0-0", 0
    while events := await cp.read_events(last_event_id, count=3):
        for event_id, worker_id, event in events:
            await replayed.publish_kv_events(worker_id, [event])
            last_event_id, num_events = event_id, num_events + 1
    assert num_events == 7  # two registrations (each logged as cleared) and five events
    for prompt in (a, b, a[:1]):
        expected = await cp.match_prefix(prompt, ["p0", "p1"])
        assert await replayed.match_prefix(prompt, ["p0", "p1"]) == expected
    assert await cp.match_prefix(a, ["p0", "p1"]) == {"p0": 4, "p1": 1}
    await cp.close()


@run_async
async def test_redis_lookups_agree_with_the_in_memory_reference(redis_server):
    """Random stores, removals (holes anywhere) and clears over long prompts, which cross
    the Lua script's doubling chunks: every lookup must equal the in-memory store's."""
    redis.Redis.from_url(redis_server.url).flushall()
    rng = random.Random(1234)
    reference, cp = MemoryControlPlane(), await RedisControlPlane.connect(redis_server.url, namespace="diff")
    worker_ids = [f"p{i}" for i in range(5)]
    for worker_id in worker_ids:
        for store in (reference, cp):
            await store.register(prefill(worker_id), ttl_seconds=30)
    prompts = [hashes_of(100 + i, rng.choice((1, 2, 33, 40, 97, 130))) for i in range(6)]
    for step in range(150):
        worker_id, prompt = rng.choice(worker_ids), rng.choice(prompts)
        roll = rng.random()
        if roll < 0.5:
            start = rng.randrange(len(prompt))
            event = KVEvent.stored(prompt[start : start + rng.randint(1, len(prompt))] if roll < 0.15 else prompt[: rng.randint(1, len(prompt))])
        elif roll < 0.9:
            event = KVEvent.removed(rng.sample(prompt, rng.randint(1, min(3, len(prompt)))))
        else:
            event = KVEvent.cleared()
        for store in (reference, cp):
            await store.publish_kv_events(worker_id, [event])
        query = rng.choice(prompts)
        candidates = rng.sample(worker_ids, rng.randint(1, len(worker_ids)))
        assert await cp.match_prefix(query, candidates) == await reference.match_prefix(query, candidates), step
    await cp.close()


@run_async
async def test_a_store_emptied_under_its_clients_is_noticed_by_every_one_and_routing_keeps_its_workers(own_redis_server):
    """A Redis restarted without its data lists no worker until each heartbeats again: every client
    counts the reset (whoever reads first), and the router keeps the last known workers meanwhile."""
    from splitserve.services.router.workers import RegistryContinuity

    router, other = await RedisControlPlane.connect(own_redis_server.url), await RedisControlPlane.connect(own_redis_server.url)
    now = [0.0]
    try:
        await router.register(prefill("p1"), ttl_seconds=30)
        continuity = RegistryContinuity(router, grace_seconds=3.0, clock=lambda: now[0])
        assert [w.info.worker_id for w in continuity.workers("prefill", await router.live_workers("prefill"))] == ["p1"]
        await other.live_workers()
        assert (router.num_resets, other.num_resets) == (0, 0)
        redis.Redis(port=own_redis_server.port).flushall()
        await other.live_workers()  # the other client finds it empty first and writes a new epoch
        listed = await router.live_workers("prefill")
        assert listed == [] and (router.num_resets, other.num_resets) == (1, 1)
        assert [w.info.worker_id for w in continuity.workers("prefill", listed)] == ["p1"]  # kept
        now[0] = 3.5  # one TTL later: what the store lists is the truth again
        assert continuity.workers("prefill", await router.live_workers("prefill")) == []
        await router.deregister("p1")  # a deregistration is no reset
        assert router.num_resets == 1
    finally:
        await router.close()
        await other.close()
