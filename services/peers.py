"""Which peers a worker may dial: only the workers the control plane lists.

A decode request names where its KV is (a prefill worker's id and address, in its KV handle),
and the decode worker then calls that address and reads from it. Taken on trust, a handle
would make the decode worker dial any address its caller names. So the handle's worker must be
a live prefill worker of the registry at that very address; anything else is refused and the
prompt is computed on the decode worker instead.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from splitserve.controlplane import ControlPlane, ControlPlaneUnavailable

log = logging.getLogger(__name__)


class ListedPeers:
    """The prefill workers the control plane lists, read again when the last read is over
    ``refresh_seconds`` old, or on a handle naming one not in it (it may have just registered),
    at most every ``min_interval_seconds`` so that forged handles cannot flood the registry."""

    def __init__(
        self, control_plane: ControlPlane, refresh_seconds: float = 1.0, min_interval_seconds: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._control_plane = control_plane
        self._refresh_seconds = refresh_seconds
        self._min_interval_seconds = min_interval_seconds
        self._clock = clock
        self._addresses: dict[str, str] = {}  # worker_id -> address
        self._read_at = -float("inf")

    async def listed(self, worker_id: str, address: str) -> bool:
        """Whether ``worker_id`` is a live prefill worker at ``address``; False when the registry cannot be read."""
        age = self._clock() - self._read_at
        if self._addresses.get(worker_id) == address and age < self._refresh_seconds:
            return True
        if age >= self._min_interval_seconds:
            try:
                # Prefill workers, and decode workers in a mixed role (they prefill for others too).
                workers = [w for w in await self._control_plane.live_workers() if w.info.role == "prefill" or w.info.accepts_prefill]
            except ControlPlaneUnavailable as e:
                log.warning("cannot check KV peer %s against the registry: %s", worker_id, e)
                return False
            self._addresses = {w.info.worker_id: w.info.address for w in workers}
            self._read_at = self._clock()
        return self._addresses.get(worker_id) == address
