"""The one interface of the control plane; every store implements it.

Workers call ``register``, ``heartbeat``, ``publish_kv_events`` and
``deregister``; routers call ``live_workers`` and ``match_prefix``. All methods
raise ``ControlPlaneUnavailable`` when the store cannot be reached.
"""
from __future__ import annotations

import abc
from collections.abc import Sequence

from splitserve.controlplane.types import KVEvent, LiveWorker, Role, WorkerInfo, WorkerLoad


class ControlPlane(abc.ABC):
    @abc.abstractmethod
    async def register(self, info: WorkerInfo, ttl_seconds: float, load: WorkerLoad | None = None) -> None:
        """Registers the worker for ``ttl_seconds`` (renewed by ``heartbeat``).

        A registration is always fresh: index entries left by an earlier
        registration of the same ``worker_id`` are dropped, so a worker that
        restarts (or whose TTL lapsed) republishes the blocks it holds.
        """

    @abc.abstractmethod
    async def heartbeat(self, worker_id: str, load: WorkerLoad) -> bool:
        """Renews the TTL and records ``load``.

        False when the worker is not registered (its TTL lapsed, or an embedded
        store restarted): the worker must ``register`` again and republish.
        """

    @abc.abstractmethod
    async def deregister(self, worker_id: str) -> None:
        """Drops the worker and its index entries now (graceful shutdown)."""

    @abc.abstractmethod
    async def publish_kv_events(self, worker_id: str, events: Sequence[KVEvent]) -> None:
        """Applies the worker's KV events to the block index, in order."""

    @abc.abstractmethod
    async def live_workers(self, role: Role | None = None) -> list[LiveWorker]:
        """Registered workers whose TTL has not lapsed, sorted by ``worker_id``.

        Workers found lapsed are dropped here, with their index entries.
        """

    @abc.abstractmethod
    async def match_prefix(self, block_hashes: Sequence[bytes], worker_ids: Sequence[str]) -> dict[str, int]:
        """For each of ``worker_ids``, how many leading blocks of the prompt it holds.

        A worker's match ends at its first missing block; the lookup stops at
        the first block that no still-matching worker holds.
        """

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> ControlPlane:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def longest_prefix_matches(
    block_hashes: Sequence[bytes], worker_ids: Sequence[str], holders_of: dict[bytes, set[str]]
) -> dict[str, int]:
    """``match_prefix`` over an in-memory index: ``holders_of[block_hash]`` is who holds it."""
    num_matched = dict.fromkeys(worker_ids, 0)
    matching = set(num_matched)
    for i, block_hash in enumerate(block_hashes):
        holders = holders_of.get(block_hash)
        still = matching & holders if holders else set()
        if len(still) < len(matching):
            for worker_id in matching - still:
                num_matched[worker_id] = i
            if not still:
                return num_matched
            matching = still
    for worker_id in matching:
        num_matched[worker_id] = len(block_hashes)
    return num_matched


def check_ttl(ttl_seconds: float) -> None:
    if not ttl_seconds > 0:
        raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds!r}")
