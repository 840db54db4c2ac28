"""Leases on a finished request's blocks, held by the prefill side for a decode worker.

Pure bookkeeping with an injected clock: the table never frees anything itself, it says
which blocks to unpin. Invariant: the blocks of every grant come back exactly once, from
``release`` or from ``expire``, never both. (Two requests sharing a prefix may both lease
the same block; the block pool counts references, so each grant's pin is undone once.)
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Lease:
    request_id: str
    block_ids: tuple[int, ...]
    ttl: float  # seconds each renewal extends the lease by
    expires_at: float  # on the table's clock


class LeaseTable:
    """Request id -> the lease on its pinned blocks."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._leases: dict[str, Lease] = {}

    def grant(self, request_id: str, block_ids: Iterable[int], ttl: float) -> Lease:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        if request_id in self._leases:
            raise ValueError(f"request {request_id!r} already holds a lease")
        blocks = tuple(block_ids)
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"request {request_id!r} leases a block twice: {blocks}")
        lease = Lease(request_id, blocks, ttl, self._clock() + ttl)
        self._leases[request_id] = lease
        return lease

    def renew(self, request_id: str) -> bool:
        """Extends a live lease by its ttl; False if it was released or has run out (a lease
        past its time is not revived: its blocks are due back from ``expire``)."""
        lease = self._leases.get(request_id)
        now = self._clock()
        if lease is None or lease.expires_at <= now:
            return False
        self._leases[request_id] = replace(lease, expires_at=now + lease.ttl)
        return True

    def release(self, request_id: str) -> list[int] | None:
        """The blocks to unpin now, or None if the lease is gone (released or expired)."""
        lease = self._leases.pop(request_id, None)
        return None if lease is None else list(lease.block_ids)

    def expire(self, now: float | None = None) -> list[Lease]:
        """Removes and returns every lease whose time is up; the caller unpins their blocks."""
        now = self._clock() if now is None else now
        # A scan, not a heap: run every few hundred ms over at most a few thousand leases.
        expired = [lease for lease in self._leases.values() if lease.expires_at <= now]
        for lease in expired:
            del self._leases[lease.request_id]
        return expired

    def next_expiry(self) -> float | None:
        """When the earliest lease runs out (to sleep until then), or None if none is held."""
        return min((lease.expires_at for lease in self._leases.values()), default=None)

    def get(self, request_id: str) -> Lease | None:
        return self._leases.get(request_id)

    def __len__(self) -> int:
        return len(self._leases)

    @property
    def num_pinned_blocks(self) -> int:
        return sum(len(lease.block_ids) for lease in self._leases.values())
