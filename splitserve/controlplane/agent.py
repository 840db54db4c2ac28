"""The worker's side of the control plane: stay registered, keep the index true.

A worker builds one WorkerAgent, starts it, and hands it its KV events as its
prefix cache changes. Whenever the index may have drifted from the cache (the
store was unreachable and events were dropped, the TTL lapsed, an embedded
store restarted with the router), the agent registers afresh, which drops
the worker's old entries, and republishes every block it holds. Stale entries
never outlive a resync; missing ones only cost cache hits until then.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

from splitserve.controlplane.interface import DEFAULT_REGISTRATION_TTL_SECONDS, ControlPlane, check_ttl, heartbeat_interval
from splitserve.controlplane.types import ControlPlaneUnavailable, KVEvent, KVEventKind, KVTier, WorkerInfo, WorkerLoad

logger = logging.getLogger(__name__)

# Block hashes per publish call (~64 KiB): keeps gRPC messages far below their
# 4 MiB limit and Redis transactions short, however large a snapshot or an event.
EVENT_BATCH_SIZE = 4096


class WorkerAgent:
    def __init__(
        self,
        control_plane: ControlPlane,
        info: WorkerInfo,
        get_load: Callable[[], WorkerLoad],
        get_block_hashes: Callable[[], Iterable[bytes]],
        ttl_seconds: float = DEFAULT_REGISTRATION_TTL_SECONDS,
        get_host_block_hashes: Callable[[], Iterable[bytes]] | None = None,
    ) -> None:
        """``get_load``, ``get_block_hashes`` (every block in the prefix cache) and
        ``get_host_block_hashes`` (every block of the host KV tier, if any) are called on the event loop."""
        check_ttl(ttl_seconds)
        self._control_plane = control_plane
        self._info = info
        self._get_load = get_load
        self._get_block_hashes = get_block_hashes
        self._get_host_block_hashes = get_host_block_hashes
        self._ttl_seconds = ttl_seconds
        # Publishing and resyncing never interleave, so the index sees the
        # snapshot and the events in the order the cache produced them.
        self._lock = asyncio.Lock()
        self._in_sync = False
        self._task: asyncio.Task[None] | None = None
        self._pending: list[KVEvent] = []  # events waiting for the flush
        self._flushing: asyncio.Future[None] | None = None

    @property
    def in_sync(self) -> bool:
        return self._in_sync

    async def start(self) -> None:
        """Registers (or keeps trying in the background) and starts heartbeating (every second, or ttl/3 when shorter)."""
        async with self._lock:
            await self._resync()
        if not self._in_sync:
            logger.warning("worker %s could not register yet; retrying every %.1fs", self._info.worker_id, heartbeat_interval(self._ttl_seconds))
        self._task = asyncio.create_task(self._heartbeat_loop(), name=f"control-plane-agent-{self._info.worker_id}")

    async def publish(self, events: Sequence[KVEvent]) -> None:
        """Publishes KV events; while out of sync they are dropped (the next resync covers them).

        Events are queued and sent by one flush at a time, whatever has gathered in one go:
        a busy engine makes events every step, and one call per step would queue up behind
        the lock faster than the control plane answers, delaying the heartbeats behind them
        past the TTL. Returns once these events (and all queued before them) are sent or dropped.
        """
        if not events:
            return
        self._pending.extend(events)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush())
        await asyncio.shield(self._flushing)

    async def _flush(self) -> None:
        while self._pending:
            events, self._pending = self._pending, []
            async with self._lock:
                if not self._in_sync:
                    continue
                try:
                    for batch in batched_events(events, EVENT_BATCH_SIZE):
                        await self._control_plane.publish_kv_events(self._info.worker_id, batch)
                except ControlPlaneUnavailable as e:
                    self._lost(e)

    async def stop(self) -> None:
        """Stops heartbeating and deregisters, so routers drop the worker now rather than after its TTL."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        async with self._lock:
            try:
                await self._control_plane.deregister(self._info.worker_id)
            except ControlPlaneUnavailable as e:
                logger.warning("could not deregister %s: %s", self._info.worker_id, e)
            self._in_sync = False

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(heartbeat_interval(self._ttl_seconds))
            try:
                async with self._lock:
                    await self._beat()
            except Exception:
                # A bug must not silently end the heartbeats (the worker would
                # vanish from routing a TTL later with nothing in the logs).
                logger.exception("control plane heartbeat of %s failed", self._info.worker_id)

    async def heartbeat_now(self) -> None:
        """Sends the load now rather than at the next beat (it changed in a way routers must see soon)."""
        async with self._lock:
            await self._beat()

    async def _beat(self) -> None:
        if not self._in_sync:
            await self._resync()
            return
        try:
            registered = await self._control_plane.heartbeat(self._info.worker_id, self._get_load())
        except ControlPlaneUnavailable as e:
            self._lost(e)
            return
        if not registered:
            logger.warning("control plane forgot worker %s; registering again", self._info.worker_id)
            await self._resync()

    async def _resync(self) -> None:
        try:
            await self._control_plane.register(self._info, self._ttl_seconds, self._get_load())
            tiers = [(KVTier.GPU, self._get_block_hashes)]
            if self._get_host_block_hashes is not None:
                tiers.append((KVTier.HOST, self._get_host_block_hashes))
            for tier, get_block_hashes in tiers:
                block_hashes = iter(get_block_hashes())
                while batch := tuple(itertools.islice(block_hashes, EVENT_BATCH_SIZE)):
                    await self._control_plane.publish_kv_events(self._info.worker_id, [KVEvent.stored(batch, tier)])
        except ControlPlaneUnavailable as e:
            self._lost(e)
            return
        if not self._in_sync:
            logger.info("worker %s registered with the control plane", self._info.worker_id)
        self._in_sync = True

    def _lost(self, error: ControlPlaneUnavailable) -> None:
        if self._in_sync:
            logger.warning("worker %s lost the control plane, will resync: %s", self._info.worker_id, error)
        self._in_sync = False


def batched_events(events: Sequence[KVEvent], max_block_hashes: int) -> Iterator[list[KVEvent]]:
    """The events in order, split into lists carrying at most ``max_block_hashes`` hashes each."""
    batch: list[KVEvent] = []
    num_hashes = 0
    for event in events:
        hashes = event.block_hashes
        while num_hashes + len(hashes) > max_block_hashes:
            room = max_block_hashes - num_hashes
            if room > 0:
                batch.append(KVEvent(event.kind, hashes[:room], event.tier))
            yield batch
            batch, num_hashes, hashes = [], 0, hashes[room:]
        if hashes or event.kind is KVEventKind.CLEARED:
            batch.append(event if hashes is event.block_hashes else KVEvent(event.kind, hashes, event.tier))
            num_hashes += len(hashes)
    if batch:
        yield batch
