"""The router's view of the workers and the block index, kept usable when the control plane is not.

Wraps a ControlPlane with what one router replica knows better than the store:

- the requests it has routed and not yet seen finish (``track``), added to the
  workers' heartbeat loads, which lag by up to a heartbeat, so a burst does not
  all land on the worker that looked idlest a second ago;
- predicted hits (the approximate mode): blocks of a prompt it just routed count
  as held by that worker for ``predict_seconds``, so a burst of one prefix goes
  to one worker before its KV events arrive;
- the last worker list it read, and a load-only fallback: when the control plane
  is unavailable ``match_prefix`` returns None (the policy then routes by load),
  a warning is logged once, and the store is not asked again for
  ``retry_seconds``, so requests never queue behind a dead store's timeouts.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from splitserve.controlplane.interface import ControlPlane
from splitserve.controlplane.types import ControlPlaneUnavailable, LiveWorker, Role, WorkerLoad

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _InFlight:
    num_requests: int = 0
    num_tokens: int = 0
    num_blocks: int = 0


class RouterIndex:
    def __init__(
        self,
        control_plane: ControlPlane,
        refresh_seconds: float = 0.5,
        predict_seconds: float = 2.0,
        retry_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._control_plane = control_plane
        self._refresh_seconds = refresh_seconds
        self._predict_seconds = predict_seconds
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._workers: list[LiveWorker] = []
        self._refreshed_at: float | None = None
        self._refresh_lock = asyncio.Lock()
        self._available = True
        self._retry_at = 0.0
        self._in_flight: dict[str, _InFlight] = {}
        self._predicted: dict[bytes, dict[str, float]] = {}  # block_hash -> {worker_id: expires_at}
        self._predictions: deque[tuple[float, str, tuple[bytes, ...]]] = deque()  # in expiry order

    @property
    def available(self) -> bool:
        """False while routing by load only."""
        return self._available

    @property
    def num_predicted_blocks(self) -> int:
        return len(self._predicted)

    async def candidates(self, role: Role) -> list[LiveWorker]:
        """Live workers of ``role`` (at most ``refresh_seconds`` old; the last known while the store is away),
        their loads raised by what this router has in flight there."""
        await self._refresh()
        return [self._with_in_flight(w) for w in self._workers if w.info.role == role]

    async def match_prefix(self, block_hashes: Sequence[bytes], worker_ids: Sequence[str]) -> dict[str, int] | None:
        """The store's ``match_prefix`` raised by recent predictions; None when the index is unavailable."""
        if not block_hashes or not worker_ids:
            return dict.fromkeys(worker_ids, 0)
        if self._clock() < self._retry_at:
            return None
        try:
            num_matched = await self._control_plane.match_prefix(block_hashes, worker_ids)
        except ControlPlaneUnavailable as e:
            self._lost(e)
            return None
        self._back()
        predicted = self._predicted_matches(block_hashes, worker_ids)
        return {w: max(num_matched.get(w, 0), predicted[w]) for w in num_matched}

    def expire(self) -> None:
        """The next ``candidates`` reads the store afresh (a worker's state just changed through this router)."""
        self._refreshed_at = None

    async def match_store(self, block_hashes: Sequence[bytes], index_ids: Sequence[str]) -> dict[str, int]:
        """The store's own ``match_prefix`` (no predictions), for index ids other than workers'
        (their host tiers); raises ControlPlaneUnavailable."""
        try:
            return await self._control_plane.match_prefix(block_hashes, index_ids)
        except ControlPlaneUnavailable as e:
            self._lost(e)
            raise

    @contextlib.contextmanager
    def track(
        self, worker_id: str, block_hashes: Sequence[bytes] = (), num_tokens: int = 0, num_blocks: int = 0
    ) -> Iterator[None]:
        """Holds a routed request against ``worker_id`` until the block exits.

        Prefill: ``block_hashes`` (predicted to be stored there) and ``num_tokens``
        (the uncached prompt tokens). Decode: ``num_blocks`` it will allocate.
        """
        if block_hashes:
            self._predict(worker_id, block_hashes)
        in_flight = self._in_flight.setdefault(worker_id, _InFlight())
        in_flight.num_requests += 1
        in_flight.num_tokens += num_tokens
        in_flight.num_blocks += num_blocks
        try:
            yield
        finally:
            in_flight.num_requests -= 1
            in_flight.num_tokens -= num_tokens
            in_flight.num_blocks -= num_blocks
            if in_flight.num_requests == 0:
                self._in_flight.pop(worker_id, None)

    async def _refresh(self) -> None:
        if not self._is_stale() or self._clock() < self._retry_at:
            return
        if self._refresh_lock.locked() and self._refreshed_at is not None:
            return  # one request refreshes (and may reap a dead worker); the rest use the list they have
        async with self._refresh_lock:
            if not self._is_stale():
                return  # another request refreshed while this one waited
            try:
                self._workers = await self._control_plane.live_workers()
            except ControlPlaneUnavailable as e:
                self._lost(e)
                return
            self._refreshed_at = self._clock()
            self._back()

    def _is_stale(self) -> bool:
        return self._refreshed_at is None or self._clock() - self._refreshed_at >= self._refresh_seconds

    def _lost(self, error: ControlPlaneUnavailable) -> None:
        self._retry_at = self._clock() + self._retry_seconds
        if self._available:
            logger.warning("control plane unavailable, routing by load only: %s", error)
            self._available = False

    def _back(self) -> None:
        if not self._available:
            logger.warning("control plane is back, routing by prefix again")
            self._available = True

    def _with_in_flight(self, worker: LiveWorker) -> LiveWorker:
        # The heartbeat load may or may not include what this router sent
        # since; taking the larger of the two counts it at most once.
        in_flight = self._in_flight.get(worker.info.worker_id)
        if in_flight is None:
            return worker
        load = worker.load
        num_used_blocks = max(load.num_total_blocks - load.num_free_blocks, min(in_flight.num_blocks, load.num_total_blocks))
        return LiveWorker(
            worker.info,
            WorkerLoad(
                num_waiting=max(load.num_waiting, in_flight.num_requests - load.num_running),
                num_running=load.num_running,
                num_tokens_in_flight=max(load.num_tokens_in_flight, in_flight.num_tokens),
                num_free_blocks=load.num_total_blocks - num_used_blocks,
                num_total_blocks=load.num_total_blocks,
                sleeping=load.sleeping,
            ),
        )

    def _predict(self, worker_id: str, block_hashes: Sequence[bytes]) -> None:
        self._expire_predictions()
        expires_at = self._clock() + self._predict_seconds
        for block_hash in block_hashes:
            self._predicted.setdefault(block_hash, {})[worker_id] = expires_at
        self._predictions.append((expires_at, worker_id, tuple(block_hashes)))

    def _predicted_matches(self, block_hashes: Sequence[bytes], worker_ids: Sequence[str]) -> dict[str, int]:
        self._expire_predictions()
        num_matched = dict.fromkeys(worker_ids, 0)
        matching = set(num_matched)
        for block_hash in block_hashes:
            holders = self._predicted.get(block_hash)
            if not holders:
                break
            matching.intersection_update(holders)
            if not matching:
                break
            for worker_id in matching:
                num_matched[worker_id] += 1
        return num_matched

    def _expire_predictions(self) -> None:
        now = self._clock()
        while self._predictions and self._predictions[0][0] <= now:
            _, worker_id, block_hashes = self._predictions.popleft()
            for block_hash in block_hashes:
                holders = self._predicted.get(block_hash)
                # A later prediction of the same block for the same worker keeps it.
                if holders is not None and holders.get(worker_id, now) <= now:
                    del holders[worker_id]
                    if not holders:
                        del self._predicted[block_hash]
