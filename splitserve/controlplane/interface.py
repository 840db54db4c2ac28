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

    @property
    def num_resets(self) -> int:
        """How many times this client found the store emptied under it (a Redis restarted without
        its data): the workers are alive but gone from the registry until they next heartbeat."""
        return 0

    async def __aenter__(self) -> ControlPlane:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


# How long a worker's registration lives without a heartbeat. Heartbeats go every second (or
# every third of a shorter TTL), so ten seconds ride out a worker starved of CPU for several of
# them (a loaded machine lapsed a 3-second TTL and refused requests with live workers); a crashed
# worker is still avoided at once, by the router's cooldown after a failed call.
DEFAULT_REGISTRATION_TTL_SECONDS = 10.0
HEARTBEAT_INTERVAL_SECONDS = 1.0


def heartbeat_interval(ttl_seconds: float) -> float:
    return min(HEARTBEAT_INTERVAL_SECONDS, ttl_seconds / 3)


def check_ttl(ttl_seconds: float) -> None:
    if not ttl_seconds > 0:
        raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds!r}")
