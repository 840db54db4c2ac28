"""KV reads between GPUs of one host, the same GPU included, with CUDA IPC.

On one GPU, UCX (NIXL's backend) moves VRAM between two processes at ~0.5 GB/s where a
copy on the device runs at hundreds: its ``cuda_ipc`` transport does not take that case, so
it emulates the read over TCP loopback (bench/results/one_gpu_h200/README.md).
This path does not go through UCX: each worker exports its KV cache once (a CUDA IPC
handle of the allocation, ``UntypedStorage._share_cuda_``), a peer on the same host opens
it once at the handshake, and a read is one copy per span on a side stream (a kernel on one
GPU, the copy engine between two), polled through a CUDA event.

The export carries the host's boot id: two processes with the same boot id run on one
kernel, hence one host. Opening can still fail (another container's ``/dev/shm``, where
torch keeps the handle's reference count); the agent then keeps NIXL for that peer.
"""
from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from splitserve.kvtransfer.descriptors import Span
from splitserve.kvtransfer.errors import TransferTimeoutError
from splitserve.kvtransfer.transfer import TransferResult, Waiting

log = logging.getLogger(__name__)


def host_id() -> str:
    """Equal in two processes exactly when they share a kernel (and so a host's GPUs)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


@dataclass(frozen=True)
class IpcExport:
    """What a peer needs to open our KV cache: the IPC handle of its CUDA allocation
    (fields as ``UntypedStorage._share_cuda_`` gives them) and where the cache lies in it."""

    host_id: str
    device_uuid: str
    handle: bytes
    storage_size: int  # bytes of the storage the cache is a view of
    storage_offset: int  # bytes from the allocation's start to the storage
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    cache_offset: int  # bytes from the storage's start to the cache
    num_bytes: int

    def encode(self) -> bytes:
        fields = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in asdict(self).items()}
        return json.dumps(fields).encode()

    @classmethod
    def decode(cls, data: bytes) -> IpcExport:
        fields = json.loads(data)
        for name in ("handle", "ref_counter_handle", "event_handle"):
            fields[name] = bytes.fromhex(fields[name])
        return cls(**fields)


def export_cache(kv_cache: torch.Tensor) -> IpcExport | None:
    """Our cache as peers on this host may open it; None off the GPU. Called once: each
    export hands out a reference count the producer keeps for the peers' lifetimes."""
    if not kv_cache.is_cuda:
        return None
    storage = kv_cache.untyped_storage()
    _, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync = storage._share_cuda_()
    return IpcExport(
        host_id=host_id(), device_uuid=device_uuid(kv_cache.device), handle=handle, storage_size=size,
        storage_offset=offset, ref_counter_handle=ref_handle, ref_counter_offset=ref_offset,
        event_handle=event_handle or b"", event_sync_required=bool(event_sync),
        cache_offset=kv_cache.storage_offset() * kv_cache.element_size(), num_bytes=kv_cache.numel() * kv_cache.element_size(),
    )


def local_device_of(uuid: str) -> int | None:
    """This process's index of the GPU with that UUID (CUDA_VISIBLE_DEVICES renumbers), if visible."""
    for index in range(torch.cuda.device_count()):
        if device_uuid(torch.device("cuda", index)) == uuid:
            return index
    return None


def import_cache(export: IpcExport, device: int) -> torch.Tensor:
    """The peer's whole cache as a flat uint8 tensor on ``device`` (our index of its GPU)."""
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(
        device, export.handle, export.storage_size, export.storage_offset, export.ref_counter_handle,
        export.ref_counter_offset, export.event_handle or None, export.event_sync_required,
    )
    flat = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", device))
    return flat.set_(storage, export.cache_offset, (export.num_bytes,))


def _engine_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src, non_blocking=True)  # another GPU: the copy engine, over NVLink or PCIe


def _sm_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """A copy on one GPU by an elementwise kernel: a cudaMemcpy between the peer's opened
    allocation and ours goes to a copy engine, ~600 GB/s on an H200 (bench/results/one_gpu_h200) against
    ~2 TB/s for a kernel. Spans are whole blocks or head slices, so 8-byte aligned."""
    if dst.numel() % 8 or dst.storage_offset() % 8 or src.storage_offset() % 8:
        _engine_copy(dst, src)
        return
    torch.bitwise_or(src.view(torch.int64), 0, out=dst.view(torch.int64))


class IpcCopies(Waiting):
    """One posted read over CUDA IPC: its copies are queued on a side stream and an event
    marks their end. It has the surface of ``PendingTransfer``: a read that misses its
    deadline is given up, and its local blocks stay in doubt until the event has passed
    (the copy engine still writes them until then)."""

    def __init__(
        self, src: torch.Tensor, dst: torch.Tensor, spans: Sequence[Span], stream: torch.cuda.Stream, *,
        peer: str, local_block_ids: tuple[int, ...], started_at: float, on_abandon: Callable[[IpcCopies], None],
    ) -> None:
        self.op = "READ"
        self.peer = peer
        self.local_block_ids = local_block_ids
        self.num_bytes = sum(s.length for s in spans)
        self.num_descriptors = len(spans)
        self.started_at = started_at
        self._on_abandon = on_abandon
        self._src = src  # the peer's mapping must outlive the copies reading it
        copy = _sm_copy if src.device == dst.device else _engine_copy
        with torch.cuda.stream(stream):
            for s in spans:
                copy(dst[s.local_offset : s.local_offset + s.length], src[s.remote_offset : s.remote_offset + s.length])
            self._event = torch.cuda.Event()
            self._event.record(stream)

    def poll(self) -> bool:
        return self._event.query()

    def settle(self) -> bool:
        return self._event.query()

    def release(self) -> None:
        pass  # nothing is held outside the event

    def _give_up(self, timeout: float) -> None:
        self._on_abandon(self)
        raise TransferTimeoutError(self.peer, timeout, self.local_block_ids)

    def _result(self) -> TransferResult:
        return TransferResult(self.peer, self.op, len(self.local_block_ids), self.num_bytes, self.num_descriptors,
                              time.perf_counter() - self.started_at)
