"""The embedded store: registry and block index in the router's own process.

Used by ``splitserve up`` on one machine; workers in other processes reach it
through ``ControlPlaneServicer`` (gRPC), so nothing else has to run. Every
method runs to completion without awaiting, so on one event loop each call is
atomic and no lock is needed.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from splitserve.controlplane.interface import ControlPlane, check_ttl, longest_prefix_matches
from splitserve.controlplane.types import KVEvent, KVEventKind, LiveWorker, Role, WorkerInfo, WorkerLoad


@dataclass(slots=True)
class _Registration:
    info: WorkerInfo
    load: WorkerLoad
    ttl_seconds: float
    expires_at: float


class MemoryControlPlane(ControlPlane):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._workers: dict[str, _Registration] = {}
        self._holders_of: dict[bytes, set[str]] = {}  # block_hash -> worker_ids holding it
        # The inverse of _holders_of, so dropping a worker touches only its own blocks.
        self._block_hashes_of: dict[str, set[bytes]] = {}

    async def register(self, info: WorkerInfo, ttl_seconds: float, load: WorkerLoad | None = None) -> None:
        check_ttl(ttl_seconds)
        self._clear_blocks(info.worker_id)
        self._workers[info.worker_id] = _Registration(info, load or WorkerLoad(), ttl_seconds, self._clock() + ttl_seconds)

    async def heartbeat(self, worker_id: str, load: WorkerLoad) -> bool:
        registration = self._workers.get(worker_id)
        now = self._clock()
        if registration is None or registration.expires_at <= now:
            return False
        registration.load = load
        registration.expires_at = now + registration.ttl_seconds
        return True

    async def deregister(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)
        self._clear_blocks(worker_id)

    async def publish_kv_events(self, worker_id: str, events: Sequence[KVEvent]) -> None:
        # Events of an unregistered worker are kept until the next reap, as in
        # Redis; match_prefix only ever counts the workers the router asks about.
        for event in events:
            if event.kind is KVEventKind.CLEARED:
                self._clear_blocks(worker_id)
            elif event.kind is KVEventKind.STORED:
                self._block_hashes_of.setdefault(worker_id, set()).update(event.block_hashes)
                for block_hash in event.block_hashes:
                    self._holders_of.setdefault(block_hash, set()).add(worker_id)
            else:
                self._remove_blocks(worker_id, event.block_hashes)

    async def live_workers(self, role: Role | None = None) -> list[LiveWorker]:
        self._reap()
        return [
            LiveWorker(r.info, r.load)
            for worker_id, r in sorted(self._workers.items())
            if role is None or r.info.role == role
        ]

    async def match_prefix(self, block_hashes: Sequence[bytes], worker_ids: Sequence[str]) -> dict[str, int]:
        return longest_prefix_matches(block_hashes, worker_ids, self._holders_of)

    async def close(self) -> None:
        pass

    @property
    def num_indexed_blocks(self) -> int:
        return len(self._holders_of)

    def _reap(self) -> None:
        now = self._clock()
        for worker_id in [w for w, r in self._workers.items() if r.expires_at <= now]:
            del self._workers[worker_id]
        for worker_id in [w for w in self._block_hashes_of if w not in self._workers]:
            self._clear_blocks(worker_id)

    def _clear_blocks(self, worker_id: str) -> None:
        self._remove_blocks(worker_id, self._block_hashes_of.pop(worker_id, ()))

    def _remove_blocks(self, worker_id: str, block_hashes: Sequence[bytes] | set[bytes]) -> None:
        held = self._block_hashes_of.get(worker_id)
        if held is not None:
            held.difference_update(block_hashes)
        for block_hash in block_hashes:
            holders = self._holders_of.get(block_hash)
            if holders is None:
                continue
            holders.discard(worker_id)
            if not holders:
                del self._holders_of[block_hash]
