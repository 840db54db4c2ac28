"""The embedded store: registry and block index in the router's own process.

Used by ``splitserve up`` on one machine; workers in other processes reach it
through ``ControlPlaneServicer`` (gRPC), so nothing else has to run. Every
method runs to completion without awaiting, so on one event loop each call is
atomic and no lock is needed.

Who holds a block is a bitmask (one bit per worker) rather than a set: a
lookup is one dict probe and an AND per block. And the index holds no object
the garbage collector tracks: CPython untracks dicts whose keys and values are
all atomic (bytes, int, None), which is why a worker's blocks are a dict of
block_hash -> None rather than a set. With a set per block, a 100k-block index
put 100k more objects into every full collection of the router process.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from splitserve.controlplane.interface import ControlPlane, check_ttl
from splitserve.controlplane.types import KVEvent, KVEventKind, KVTier, LiveWorker, Role, WorkerInfo, WorkerLoad, host_index_id, index_owner


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
        self._holders_of: dict[bytes, int] = {}  # block_hash -> OR of the bits of the workers holding it
        # The inverse (worker_id -> {block_hash: None}), so dropping a worker
        # touches only its own blocks.
        self._block_hashes_of: dict[str, dict[bytes, None]] = {}
        # A bit per worker with index entries; freed (for reuse) once it has none.
        self._bit_of: dict[str, int] = {}
        self._free_bits: list[int] = []
        self._num_bits = 0

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
        # A worker's host tier is indexed as a worker of its own (host_index_id), owned by it.
        for event in events:
            index_id = worker_id if event.tier is KVTier.GPU else host_index_id(worker_id)
            if event.kind is KVEventKind.CLEARED:
                self._clear_blocks(worker_id)
            elif event.kind is KVEventKind.STORED:
                self._store_blocks(index_id, event.block_hashes)
            else:
                self._remove_blocks(index_id, event.block_hashes)

    async def live_workers(self, role: Role | None = None) -> list[LiveWorker]:
        self._reap()
        return [
            LiveWorker(r.info, r.load)
            for worker_id, r in sorted(self._workers.items())
            if role is None or r.info.role == role
        ]

    async def match_prefix(self, block_hashes: Sequence[bytes], worker_ids: Sequence[str]) -> dict[str, int]:
        num_matched = dict.fromkeys(worker_ids, 0)
        worker_of = {self._bit_of[w]: w for w in num_matched if w in self._bit_of}
        matching = sum(worker_of)
        if not matching:
            return num_matched
        holders_of = self._holders_of
        for i, block_hash in enumerate(block_hashes):
            still = matching & holders_of.get(block_hash, 0)
            if still != matching:
                dropped = matching & ~still
                for bit, worker_id in worker_of.items():
                    if bit & dropped:
                        num_matched[worker_id] = i
                if not still:
                    return num_matched
                matching = still
        for bit, worker_id in worker_of.items():
            if bit & matching:
                num_matched[worker_id] = len(block_hashes)
        return num_matched

    async def close(self) -> None:
        pass

    @property
    def num_indexed_blocks(self) -> int:
        return len(self._holders_of)

    def _reap(self) -> None:
        now = self._clock()
        for worker_id in [w for w, r in self._workers.items() if r.expires_at <= now]:
            del self._workers[worker_id]
        for worker_id in {index_owner(w) for w in self._block_hashes_of if index_owner(w) not in self._workers}:
            self._clear_blocks(worker_id)

    def _store_blocks(self, worker_id: str, block_hashes: Iterable[bytes]) -> None:
        bit = self._bit_of.get(worker_id)
        if bit is None:
            bit = self._free_bits.pop() if self._free_bits else 1 << self._num_bits
            self._num_bits += bit == 1 << self._num_bits
            self._bit_of[worker_id] = bit
            self._block_hashes_of[worker_id] = {}
        held = self._block_hashes_of[worker_id]
        holders_of = self._holders_of
        for block_hash in block_hashes:
            holders_of[block_hash] = holders_of.get(block_hash, 0) | bit
            held[block_hash] = None

    def _remove_blocks(self, worker_id: str, block_hashes: Iterable[bytes]) -> None:
        held = self._block_hashes_of.get(worker_id)
        if held is None:
            return
        keep = ~self._bit_of[worker_id]
        holders_of = self._holders_of
        for block_hash in block_hashes:
            if block_hash in held:
                del held[block_hash]
                holders = holders_of[block_hash] & keep
                if holders:
                    holders_of[block_hash] = holders
                else:
                    del holders_of[block_hash]

    def _clear_blocks(self, worker_id: str) -> None:
        """Drops the worker's index entries, both tiers."""
        for index_id in (worker_id, host_index_id(worker_id)):
            held = self._block_hashes_of.get(index_id)
            if held is None:
                continue
            self._remove_blocks(index_id, list(held))
            del self._block_hashes_of[index_id]
            self._free_bits.append(self._bit_of.pop(index_id))
