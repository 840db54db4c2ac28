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
    """The prefill workers the control plane lists, read again at most every ``refresh_seconds``
    (and at once, that often, when a handle names one not yet seen: it may have just registered)."""

    def __init__(self, control_plane: ControlPlane, refresh_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._control_plane = control_plane
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self._addresses: dict[str, str] = {}  # worker_id -> address
        self._read_at: float | None = None

    async def listed(self, worker_id: str, address: str) -> bool:
        """Whether ``worker_id`` is a live prefill worker at ``address``; False when the registry cannot be read."""
        if self._addresses.get(worker_id) == address and not self._stale():
            return True
        if self._read_at is not None and not self._stale():
            return False
        try:
            workers = await self._control_plane.live_workers("prefill")
        except ControlPlaneUnavailable as e:
            log.warning("cannot check KV peer %s against the registry: %s", worker_id, e)
            return False
        self._addresses = {w.info.worker_id: w.info.address for w in workers}
        self._read_at = self._clock()
        return self._addresses.get(worker_id) == address

    def _stale(self) -> bool:
        return self._read_at is None or self._clock() - self._read_at >= self._refresh_seconds
