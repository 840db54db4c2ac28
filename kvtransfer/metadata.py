"""What one agent tells another so that it can address its KV cache.

NIXL's own metadata says how to reach an agent and which memory it registered, but the
Python API cannot read the registered addresses back out of it, and descriptors need them.
So the bytes the services carry (proto ``TransferMetadata.agent_metadata``) are a short
fixed header describing the registered cache, the cache's CUDA IPC export when it is GPU
memory (for peers on the same host), then NIXL's metadata unchanged.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from splitserve.kvtransfer.cuda_ipc import IpcExport
from splitserve.kvtransfer.errors import BadMetadataError

_MAGIC = b"SSKV"
_VERSION = 2
# magic, version, memory kind (0 DRAM, 1 VRAM), device id, base address, num_blocks, block_bytes,
# length of the IPC export that follows (0: none)
_HEADER = struct.Struct("<4sHBxiQQQI")
_MEM_KINDS = ("DRAM", "VRAM")


@dataclass(frozen=True)
class CacheRegion:
    """A registered KV cache: ``num_blocks`` blocks of ``block_bytes`` from ``base_addr``."""

    mem_type: str  # "DRAM" (host) or "VRAM" (device)
    device_id: int
    base_addr: int
    num_blocks: int
    block_bytes: int

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.block_bytes


@dataclass(frozen=True)
class AgentMetadata:
    region: CacheRegion
    nixl_metadata: bytes
    ipc: IpcExport | None = None

    def encode(self) -> bytes:
        r = self.region
        ipc = self.ipc.encode() if self.ipc is not None else b""
        header = _HEADER.pack(
            _MAGIC, _VERSION, _MEM_KINDS.index(r.mem_type), r.device_id,
            r.base_addr, r.num_blocks, r.block_bytes, len(ipc),
        )
        return header + ipc + self.nixl_metadata

    @classmethod
    def decode(cls, data: bytes) -> AgentMetadata:
        if len(data) <= _HEADER.size:
            raise BadMetadataError(f"agent metadata is {len(data)} bytes, too short")
        magic, version, kind, device_id, base, num_blocks, block_bytes, ipc_len = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != _VERSION:
            raise BadMetadataError(
                f"agent metadata has magic {magic!r} version {version}; "
                f"expected {_MAGIC!r} version {_VERSION}"
            )
        if kind >= len(_MEM_KINDS):
            raise BadMetadataError(f"agent metadata names unknown memory kind {kind}")
        region = CacheRegion(_MEM_KINDS[kind], device_id, base, num_blocks, block_bytes)
        end = _HEADER.size + ipc_len
        if len(data) <= end:
            raise BadMetadataError(f"agent metadata is {len(data)} bytes, too short for its {ipc_len}-byte IPC export")
        try:
            ipc = IpcExport.decode(bytes(data[_HEADER.size:end])) if ipc_len else None
        except (ValueError, TypeError, KeyError) as e:
            raise BadMetadataError(f"agent metadata has an unreadable IPC export: {e}") from None
        return cls(region, bytes(data[end:]), ipc)
