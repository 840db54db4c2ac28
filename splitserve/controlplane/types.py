"""What workers tell the control plane, and what the router reads back.

These are the only objects that cross the control plane's boundary; the Redis
encoding and the gRPC messages of the embedded mode are converted to and from
them at the edge.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, NamedTuple

BLOCK_HASH_BYTES = 16  # splitserve.engine.prefix_hash.BlockHash

Role = Literal["prefill", "decode"]
ROLES: tuple[Role, ...] = ("prefill", "decode")


class ControlPlaneError(Exception):
    """Base of the control plane's own errors."""


class ControlPlaneUnavailable(ControlPlaneError):
    """The store cannot be reached (at start, or lost mid-run); the message names it.

    Raised within the store's socket timeout, so a router can fall back to
    load-only routing instead of stalling requests.
    """


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a worker is: fixed for the lifetime of one registration."""

    worker_id: str
    role: Role
    address: str  # the worker's gRPC address, host:port
    block_size: int
    tp_size: int = 1
    model: str = ""
    kv_cache_dtype: str = ""  # what the worker's KV cache holds ("" from workers that predate it)
    quantization: str = ""  # its weights': "none" or "fp8"
    # A decode worker that also takes prefill-only work for other decode workers (mixed role,
    # --accept-prefill); the router gives it some only while its own batch leaves room.
    accepts_prefill: bool = False

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.accepts_prefill and self.role != "decode":
            raise ValueError("only a decode worker takes a mixed role (accepts_prefill)")
        if self.block_size <= 0 or self.tp_size <= 0:
            raise ValueError(f"block_size and tp_size must be positive, got {self.block_size}, {self.tp_size}")


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """A worker's load as of its last heartbeat (the fields of WorkerStats the router uses)."""

    num_waiting: int = 0
    num_running: int = 0
    num_tokens_in_flight: int = 0  # accepted prompt tokens not yet computed (queued or mid-prefill)
    num_free_blocks: int = 0
    num_total_blocks: int = 0

    def __post_init__(self) -> None:
        for name in ("num_waiting", "num_running", "num_tokens_in_flight", "num_free_blocks", "num_total_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.num_free_blocks > self.num_total_blocks:
            raise ValueError(f"num_free_blocks {self.num_free_blocks} exceeds num_total_blocks {self.num_total_blocks}")


class KVEventKind(str, enum.Enum):
    STORED = "stored"  # the blocks are now in the worker's prefix cache
    REMOVED = "removed"  # evicted
    CLEARED = "cleared"  # every block is gone (cache reset, restart)


@dataclass(frozen=True, slots=True)
class KVEvent:
    kind: KVEventKind
    block_hashes: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", KVEventKind(self.kind))
        object.__setattr__(self, "block_hashes", tuple(self.block_hashes))
        if self.kind is KVEventKind.CLEARED and self.block_hashes:
            raise ValueError("a cleared event carries no block hashes")
        for block_hash in self.block_hashes:
            if not isinstance(block_hash, bytes) or len(block_hash) != BLOCK_HASH_BYTES:
                raise ValueError(f"block hashes are {BLOCK_HASH_BYTES} bytes, got {block_hash!r}")

    @classmethod
    def stored(cls, block_hashes: tuple[bytes, ...] | list[bytes]) -> KVEvent:
        return cls(KVEventKind.STORED, tuple(block_hashes))

    @classmethod
    def removed(cls, block_hashes: tuple[bytes, ...] | list[bytes]) -> KVEvent:
        return cls(KVEventKind.REMOVED, tuple(block_hashes))

    @classmethod
    def cleared(cls) -> KVEvent:
        return cls(KVEventKind.CLEARED)


class LiveWorker(NamedTuple):
    """One entry of ``live_workers``: unpacks as ``info, load``."""

    info: WorkerInfo
    load: WorkerLoad
