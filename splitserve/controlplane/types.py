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
    host_kv_blocks: int = 0  # blocks of the worker's host KV tier; 0: none

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
        if "\x00" in self.worker_id:
            raise ValueError("worker_id must not contain NUL")
        if self.host_kv_blocks < 0:
            raise ValueError(f"host_kv_blocks must not be negative, got {self.host_kv_blocks}")
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
    sleeping: bool = False  # asleep (KV cache freed, weights off the GPU): route nothing to it

    def __post_init__(self) -> None:
        for name in ("num_waiting", "num_running", "num_tokens_in_flight", "num_free_blocks", "num_total_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.num_free_blocks > self.num_total_blocks:
            raise ValueError(f"num_free_blocks {self.num_free_blocks} exceeds num_total_blocks {self.num_total_blocks}")


class KVTier(str, enum.Enum):
    GPU = "gpu"  # the worker's KV cache: a hit costs nothing
    HOST = "host"  # its host-memory tier: a hit costs a copy back, far less than recomputing


def host_index_id(worker_id: str) -> str:
    """The key a store indexes a worker's host-tier blocks under: a worker of its own to
    ``match_prefix``, owned by ``worker_id`` (cleared and reaped with it). Not a valid worker id."""
    return worker_id + HOST_INDEX_SUFFIX


HOST_INDEX_SUFFIX = "\x00host"


def index_owner(index_id: str) -> str:
    return index_id.removesuffix(HOST_INDEX_SUFFIX)


class KVEventKind(str, enum.Enum):
    STORED = "stored"  # the blocks are now in the worker's prefix cache
    REMOVED = "removed"  # evicted
    CLEARED = "cleared"  # every block is gone (cache reset, restart)


@dataclass(frozen=True, slots=True)
class KVEvent:
    kind: KVEventKind
    block_hashes: tuple[bytes, ...] = ()
    tier: KVTier = KVTier.GPU  # a CLEARED event empties every tier whatever it says

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", KVEventKind(self.kind))
        object.__setattr__(self, "tier", KVTier(self.tier))
        object.__setattr__(self, "block_hashes", tuple(self.block_hashes))
        if self.kind is KVEventKind.CLEARED and self.block_hashes:
            raise ValueError("a cleared event carries no block hashes")
        for block_hash in self.block_hashes:
            if not isinstance(block_hash, bytes) or len(block_hash) != BLOCK_HASH_BYTES:
                raise ValueError(f"block hashes are {BLOCK_HASH_BYTES} bytes, got {block_hash!r}")

    @classmethod
    def stored(cls, block_hashes: tuple[bytes, ...] | list[bytes], tier: KVTier = KVTier.GPU) -> KVEvent:
        return cls(KVEventKind.STORED, tuple(block_hashes), tier)

    @classmethod
    def removed(cls, block_hashes: tuple[bytes, ...] | list[bytes], tier: KVTier = KVTier.GPU) -> KVEvent:
        return cls(KVEventKind.REMOVED, tuple(block_hashes), tier)

    @classmethod
    def cleared(cls) -> KVEvent:
        return cls(KVEventKind.CLEARED)


class LiveWorker(NamedTuple):
    """One entry of ``live_workers``: unpacks as ``info, load``."""

    info: WorkerInfo
    load: WorkerLoad
