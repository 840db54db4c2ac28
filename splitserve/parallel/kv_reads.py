"""One rank's part of a KV read: the head slices it pulls from the prefill ranks holding them.

The same coroutine runs on rank 0 (on the service's event loop) and in the other rank
processes (on their transfer thread's loop), each with its own NIXL agent and deadline.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from splitserve.kvtransfer import KVTransferAgent, KVTransferError, PeerDisconnectedError, TransferTimeoutError
from splitserve.kvtransfer.descriptors import HeadSlice

OK, TIMEOUT, DISCONNECTED, FAILED = "ok", "timeout", "disconnected", "failed"


@dataclass(frozen=True)
class SliceRead:
    peer: str  # the agent of the remote rank that holds the heads
    heads: HeadSlice


@dataclass(frozen=True)
class ReadOutcome:
    """How one rank's reads ended. ``timeout``: its local blocks are in doubt until its agent
    reclaims them; ``disconnected``: a peer's process is gone."""

    status: str
    num_bytes: int = 0
    error: str = ""
    num_given_up: int = 0  # READs left to the agent's reclaim(): each returns the local blocks once

    def to_message(self) -> dict:
        return {"status": self.status, "num_bytes": self.num_bytes, "error": self.error, "num_given_up": self.num_given_up}

    @classmethod
    def from_message(cls, msg: dict) -> ReadOutcome:
        return cls(msg["status"], msg["num_bytes"], msg["error"], msg["num_given_up"])


async def read_slices(
    agent: KVTransferAgent,
    reads: Sequence[SliceRead],
    remote_block_ids: Sequence[int],
    local_block_ids: Sequence[int],
    *,
    notify: bytes,
    timeout: float,
) -> ReadOutcome:
    """Posts every slice at once and waits for all; never raises."""
    results = await asyncio.gather(
        *(
            agent.read_blocks_async(r.peer, remote_block_ids, local_block_ids, notify=notify, timeout=timeout, heads=r.heads)
            for r in reads
        ),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    num_bytes = sum(r.num_bytes for r in results if not isinstance(r, BaseException))
    given_up = sum(isinstance(e, TransferTimeoutError) for e in errors)
    # A timed-out slice leaves the blocks in doubt whatever the others did, so it ranks first.
    for kind, status in ((TransferTimeoutError, TIMEOUT), (PeerDisconnectedError, DISCONNECTED), (BaseException, FAILED)):
        first = next((e for e in errors if isinstance(e, kind)), None)
        if first is not None:
            text = str(first) if isinstance(first, KVTransferError) else f"{type(first).__name__}: {first}"
            return ReadOutcome(status, num_bytes, text, given_up)
    return ReadOutcome(OK, num_bytes)
