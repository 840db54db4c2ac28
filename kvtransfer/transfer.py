"""One posted NIXL transfer: polling it, waiting for it with a deadline, giving it up."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from splitserve.kvtransfer.errors import (
    KVTransferError,
    TransferFailedError,
    TransferTimeoutError,
    translate_nixl_errors,
)

logger = logging.getLogger(__name__)

# Polling: poll back to back while a transfer is young (up to 1 GiB of block_major KV
# moves GPU to GPU within 5 ms; even time.sleep(0) costs ~50-90 us on a VM), then sleep a
# twentieth of its age, so noticing completion adds at most ~5% to a long transfer, capped
# so no poll is more than 2 ms late.
_SPIN_S = 5e-3
_MAX_SLEEP_S = 2e-3


def pause(elapsed: float) -> float:
    return 0.0 if elapsed < _SPIN_S else min(elapsed / 20, _MAX_SLEEP_S)


@dataclass(frozen=True)
class TransferResult:
    """A finished transfer, for stats and logs."""

    peer: str
    op: str  # "READ" (we pulled) or "WRITE" (we pushed)
    num_blocks: int
    num_bytes: int
    num_descriptors: int
    seconds: float


class Waiting:
    """Waiting with a deadline for a posted transfer of either path: ``poll()`` says whether it
    is done, ``_give_up`` raises at the deadline (counted from ``started_at``)."""

    started_at: float

    def poll(self) -> bool:
        raise NotImplementedError

    def _give_up(self, timeout: float) -> None:
        raise NotImplementedError

    def _result(self) -> TransferResult:
        raise NotImplementedError

    def wait(self, timeout: float) -> TransferResult:
        while not self.poll():
            elapsed = time.perf_counter() - self.started_at
            if elapsed >= timeout:
                self._give_up(timeout)
            delay = pause(elapsed)
            if delay:
                time.sleep(delay)
        return self._result()

    async def wait_async(self, timeout: float) -> TransferResult:
        while not self.poll():
            elapsed = time.perf_counter() - self.started_at
            if elapsed >= timeout:
                self._give_up(timeout)
            await asyncio.sleep(pause(elapsed))  # 0: only yields to the event loop
        return self._result()


class PendingTransfer(Waiting):
    """A transfer NIXL has accepted. ``wait``/``wait_async`` return its result or raise;
    at the deadline the transfer is handed to ``on_abandon`` (the agent parks it until
    NIXL says it is over, because releasing a handle does not stop the peer's copy)."""

    def __init__(
        self,
        nixl: Any,  # nixl._api.nixl_agent
        handle: Any,  # nixl._api.nixl_xfer_handle
        *,
        op: str,
        peer: str,
        local_block_ids: tuple[int, ...],
        num_bytes: int,
        num_descriptors: int,
        started_at: float,  # perf_counter() when the caller began: the deadline counts from it
        on_abandon: Callable[[PendingTransfer], None],
    ) -> None:
        self.op = op
        self.peer = peer
        self.local_block_ids = local_block_ids
        self.num_bytes = num_bytes
        self.num_descriptors = num_descriptors
        self.started_at = started_at
        self._nixl = nixl
        self._handle = handle
        self._on_abandon = on_abandon
        self._done = False

    def post(self) -> None:
        self._advance(self._nixl.transfer, "posting")

    def poll(self) -> bool:
        """True once the transfer is complete; raises if NIXL reports a failure."""
        if not self._done:
            self._advance(self._nixl.check_xfer_state, "polling")
        return self._done

    def settle(self) -> bool:
        """For a given-up transfer: True once it is over either way (done or failed)."""
        try:
            return self.poll()
        except KVTransferError:
            return True

    def release(self) -> None:
        """Frees NIXL's request handle; never raises (a failed release is only logged)."""
        try:
            self._handle.release()
        except Exception:
            logger.warning("releasing a %s handle for peer %r failed", self.op, self.peer,
                           exc_info=True)

    def _advance(self, nixl_call: Callable[[Any], str], what: str) -> None:
        # A transfer that is done or raised is over, so its handle is freed at once.
        try:
            with translate_nixl_errors(f"{what} {self.op}", self.peer):
                state = nixl_call(self._handle)
            if state == "ERR":
                raise TransferFailedError(f"{self.op} with peer {self.peer!r} ended in error")
        except KVTransferError:
            self.release()
            raise
        self._done = state == "DONE"
        if self._done:
            self.release()

    def _give_up(self, timeout: float) -> None:
        self._on_abandon(self)
        in_doubt = self.local_block_ids if self.op == "READ" else ()
        raise TransferTimeoutError(self.peer, timeout, in_doubt)

    def _result(self) -> TransferResult:
        return TransferResult(
            peer=self.peer,
            op=self.op,
            num_blocks=len(self.local_block_ids),
            num_bytes=self.num_bytes,
            num_descriptors=self.num_descriptors,
            seconds=time.perf_counter() - self.started_at,
        )
