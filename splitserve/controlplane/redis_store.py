"""The cluster store: registry, block index and KV event log in one Redis.

Every router replica reads the same keys, so replicas share one view and a
restarted router finds the index where it left it. Keys, under a namespace:

    {ns}:workers                  set of worker ids ever registered and not yet reaped
    {ns}:worker:{worker_id}       hash {info, load, ttl_ms}, expiring after ttl_ms (PEXPIRE)
    {ns}:worker_blocks:{worker_id} set of the block hashes the worker holds
    {ns}:block:<16 raw bytes>     hash {worker_id: 1} of the workers holding that block
                                  (a worker's host KV tier is indexed under host_index_id(worker_id),
                                  cleared and reaped with the worker)
    {ns}:kv_events                stream of every applied event, capped (MAXLEN ~)
    {ns}:epoch                    a random token set by the first client to find it missing: when
                                  it changes, the store was emptied (restarted without its data)

The block index is written together with the stream entry, in one
transaction, by the worker that publishes; the stream is the ordered log
(``read_events``) for replay, debugging and metrics, not a work queue. A
lookup is one Lua call: the block hash of the prompt's first block says which
workers to follow, and each of those checks the rest against its own block set
(redis_scripts.MATCH_PREFIX). A worker whose registration expired is reaped,
its index entries with it, by whichever router lists workers next.
"""
from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from splitserve.controlplane import redis_scripts
from splitserve.controlplane.interface import ControlPlane, check_ttl
from splitserve.controlplane.types import (
    BLOCK_HASH_BYTES,
    ControlPlaneUnavailable,
    KVEvent,
    KVEventKind,
    KVTier,
    LiveWorker,
    Role,
    WorkerInfo,
    WorkerLoad,
    host_index_id,
)

CLEAR_BATCH_SIZE = 1000  # index entries dropped per script call


class StreamEvent(NamedTuple):
    event_id: str
    worker_id: str
    event: KVEvent


class RedisControlPlane(ControlPlane):
    """Use ``await RedisControlPlane.connect(url)``; it fails at once if Redis is not there."""

    def __init__(self, client: aioredis.Redis, url: str, namespace: str, stream_maxlen: int) -> None:
        self._redis = client
        self._url = redact_url(url)
        self._ns = namespace
        self._block_key_prefix = f"{namespace}:block:".encode()
        self._stream_maxlen = stream_maxlen
        self._heartbeat = client.register_script(redis_scripts.HEARTBEAT)
        self._match = client.register_script(redis_scripts.MATCH_PREFIX)
        self._clear = client.register_script(redis_scripts.CLEAR_BLOCKS)
        self._reaping: set[str] = set()  # worker ids this client is reaping now
        self._epoch: bytes | None = None  # the store's epoch token as last read
        self._num_resets = 0

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        namespace: str = "splitserve",
        timeout_seconds: float = 0.5,
        stream_maxlen: int = 10_000,
    ) -> RedisControlPlane:
        # Short socket timeouts and a single immediate retry (which replaces a
        # pooled connection broken by a Redis restart): a lost Redis must show
        # up as ControlPlaneUnavailable within about timeout_seconds, never as
        # a request stalled behind reconnect backoff.
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 1),
        )
        store = cls(client, url, namespace, stream_maxlen)
        try:
            with store._unavailable_on_error():
                await client.ping()
        except ControlPlaneUnavailable:
            await client.aclose()
            raise
        return store

    async def register(self, info: WorkerInfo, ttl_seconds: float, load: WorkerLoad | None = None) -> None:
        check_ttl(ttl_seconds)
        ttl_ms = max(1, round(ttl_seconds * 1000))
        key = self._worker_key(info.worker_id)
        with self._unavailable_on_error():
            await self._clear_blocks(info.worker_id, mode="owner")
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(key)
            pipe.hset(key, mapping={"info": _dumps(info), "load": _dumps(load or WorkerLoad()), "ttl_ms": ttl_ms})
            pipe.pexpire(key, ttl_ms)
            pipe.sadd(self._workers_key, info.worker_id)
            self._append_event(pipe, info.worker_id, KVEvent.cleared())
            await pipe.execute()

    async def heartbeat(self, worker_id: str, load: WorkerLoad) -> bool:
        with self._unavailable_on_error():
            return bool(await self._heartbeat(keys=[self._worker_key(worker_id)], args=[_dumps(load)]))

    async def deregister(self, worker_id: str) -> None:
        with self._unavailable_on_error():
            await self._redis.delete(self._worker_key(worker_id))
            await self._clear_blocks(worker_id, mode="owner")
            pipe = self._redis.pipeline(transaction=True)
            pipe.srem(self._workers_key, worker_id)
            self._append_event(pipe, worker_id, KVEvent.cleared())
            await pipe.execute()

    async def publish_kv_events(self, worker_id: str, events: Sequence[KVEvent]) -> None:
        with self._unavailable_on_error():
            pipe = self._redis.pipeline(transaction=True)
            # Tracked even if unregistered, so the reaper finds these entries.
            pipe.sadd(self._workers_key, worker_id)
            for event in events:
                if event.kind is KVEventKind.CLEARED:
                    # The clear runs in batches outside the transaction, so
                    # what came before it must be applied first.
                    await pipe.execute()
                    await self._clear_blocks(worker_id, mode="owner")
                    pipe = self._redis.pipeline(transaction=True)
                elif event.kind is KVEventKind.STORED and event.block_hashes:
                    index_id = worker_id if event.tier is KVTier.GPU else host_index_id(worker_id)
                    for block_hash in event.block_hashes:
                        pipe.hset(self._block_key_prefix + block_hash, index_id, 1)
                    pipe.sadd(self._worker_blocks_key(index_id), *event.block_hashes)
                elif event.block_hashes:
                    index_id = worker_id if event.tier is KVTier.GPU else host_index_id(worker_id)
                    for block_hash in event.block_hashes:
                        pipe.hdel(self._block_key_prefix + block_hash, index_id)
                    pipe.srem(self._worker_blocks_key(index_id), *event.block_hashes)
                self._append_event(pipe, worker_id, event)
            await pipe.execute()

    @property
    def num_resets(self) -> int:
        return self._num_resets

    async def live_workers(self, role: Role | None = None) -> list[LiveWorker]:
        with self._unavailable_on_error():
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(self._epoch_key, uuid.uuid4().hex, nx=True)
            pipe.get(self._epoch_key)
            pipe.smembers(self._workers_key)
            _, epoch, members = await pipe.execute()
            if self._epoch is not None and epoch != self._epoch:
                self._num_resets += 1
            self._epoch = epoch
            worker_ids = sorted(w.decode() for w in members)
            pipe = self._redis.pipeline(transaction=False)
            for worker_id in worker_ids:
                pipe.hmget(self._worker_key(worker_id), "info", "load")
            rows = await pipe.execute() if worker_ids else []
            live, lapsed = [], []
            for worker_id, (info, load) in zip(worker_ids, rows):
                if info is None:
                    lapsed.append(worker_id)
                    continue
                worker = LiveWorker(WorkerInfo(**json.loads(info)), WorkerLoad(**json.loads(load)))
                if role is None or worker.info.role == role:
                    live.append(worker)
            for worker_id in lapsed:
                await self._reap(worker_id)
            return live

    async def match_prefix(self, block_hashes: Sequence[bytes], worker_ids: Sequence[str]) -> dict[str, int]:
        worker_ids = list(dict.fromkeys(worker_ids))
        if not block_hashes or not worker_ids:
            return dict.fromkeys(worker_ids, 0)
        if any(len(block_hash) != BLOCK_HASH_BYTES for block_hash in block_hashes):
            raise ValueError(f"block hashes are {BLOCK_HASH_BYTES} bytes")
        args = [self._block_key_prefix, self._worker_blocks_key(""), b"".join(block_hashes), *worker_ids]
        with self._unavailable_on_error():
            num_matched = await self._match(keys=[], args=args)
        return dict(zip(worker_ids, (int(n) for n in num_matched)))

    async def read_events(self, after_event_id: str = "0-0", count: int = 1000) -> list[StreamEvent]:
        """Up to ``count`` logged events after ``after_event_id``, oldest first."""
        with self._unavailable_on_error():
            entries = await self._redis.xrange(self._events_key, min=f"({after_event_id}", max="+", count=count)
        return [StreamEvent(event_id.decode(), *_parse_event(fields)) for event_id, fields in entries]

    async def close(self) -> None:
        await self._redis.aclose()

    async def _reap(self, worker_id: str) -> None:
        if worker_id in self._reaping:
            return
        self._reaping.add(worker_id)
        try:
            if await self._clear_blocks(worker_id, mode="lapsed"):
                pipe = self._redis.pipeline(transaction=False)
                self._append_event(pipe, worker_id, KVEvent.cleared())
                await pipe.execute()
        finally:
            self._reaping.discard(worker_id)

    async def _clear_blocks(self, worker_id: str, mode: str) -> bool:
        """Drops the worker's index entries (its host tier's first) in batches; False if a
        'lapsed' reap found it registered again."""
        for index_id in (host_index_id(worker_id), worker_id):
            # The host tier's entries never remove the worker from the set of known ids (it has its own).
            keys = [self._worker_key(worker_id), self._worker_blocks_key(index_id), self._workers_key]
            args = [index_id, self._block_key_prefix, CLEAR_BATCH_SIZE, mode]
            while True:
                left = int(await self._clear(keys=keys, args=args))
                if left <= 0:
                    break
            if left < 0:
                return False
        return True

    def _append_event(self, pipe: aioredis.client.Pipeline, worker_id: str, event: KVEvent) -> None:
        fields = {"worker_id": worker_id, "kind": event.kind.value, "block_hashes": b"".join(event.block_hashes), "tier": event.tier.value}
        pipe.xadd(self._events_key, fields, maxlen=self._stream_maxlen, approximate=True)

    @contextlib.contextmanager
    def _unavailable_on_error(self) -> Iterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError) as e:
            raise ControlPlaneUnavailable(f"Redis at {self._url} is unavailable: {e}") from e

    @property
    def _workers_key(self) -> str:
        return f"{self._ns}:workers"

    @property
    def _epoch_key(self) -> str:
        return f"{self._ns}:epoch"

    @property
    def _events_key(self) -> str:
        return f"{self._ns}:kv_events"

    def _worker_key(self, worker_id: str) -> str:
        return f"{self._ns}:worker:{worker_id}"

    def _worker_blocks_key(self, worker_id: str) -> str:
        return f"{self._ns}:worker_blocks:{worker_id}"


def redact_url(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def _dumps(value: WorkerInfo | WorkerLoad) -> str:
    return json.dumps(asdict(value), separators=(",", ":"))


def _parse_event(fields: dict[bytes, bytes]) -> tuple[str, KVEvent]:
    raw = fields[b"block_hashes"]
    block_hashes = tuple(raw[i : i + BLOCK_HASH_BYTES] for i in range(0, len(raw), BLOCK_HASH_BYTES))
    tier = KVTier(fields.get(b"tier", b"gpu").decode())
    return fields[b"worker_id"].decode(), KVEvent(KVEventKind(fields[b"kind"].decode()), block_hashes, tier)
