"""Which way KV moves to a peer, chosen once per peer at the handshake.

CUDA IPC (the copy engine) between GPUs of one host, the same GPU included; NIXL (UCX:
RDMA between hosts, its own transports elsewhere) for everything else, host memory too.
"""
from __future__ import annotations

from collections.abc import Callable

from splitserve.kvtransfer.cuda_ipc import IpcExport
from splitserve.kvtransfer.metadata import CacheRegion

CUDA_IPC = "cuda_ipc"
NIXL = "nixl"

# Below this a read between GPUs is being staged through host memory or a socket: PCIe 4
# x16 alone moves ~25 GB/s and the copy engine on one GPU hundreds.
SLOW_VRAM_GBPS = 5.0


def choose_path(
    ours: CacheRegion, our_export: IpcExport | None, theirs: CacheRegion, their_export: IpcExport | None,
    local_device_of: Callable[[str], int | None],
) -> str:
    """CUDA_IPC when both caches are GPU memory on one host, both exported, and the peer's GPU
    is visible here (``local_device_of(uuid)`` gives our index of it, or None); else NIXL."""
    if ours.mem_type != "VRAM" or theirs.mem_type != "VRAM" or our_export is None or their_export is None:
        return NIXL
    if our_export.host_id != their_export.host_id:
        return NIXL
    return CUDA_IPC if local_device_of(their_export.device_uuid) is not None else NIXL


def slow_path_cause(path: str, ours: CacheRegion, theirs: CacheRegion, same_host: bool) -> str | None:
    """The likely reason a measured read is far below the hardware, or None where no GPU is involved."""
    if ours.mem_type != "VRAM" or theirs.mem_type != "VRAM":
        return None
    if path == CUDA_IPC:
        return "CUDA IPC copies are slow: the GPUs lack peer access (copies go through host memory) or the GPU is saturated"
    if same_host:
        return ("UCX moves VRAM between processes of one host without cuda_ipc (both on one GPU, or CUDA IPC could not "
                "open the peer's memory: another container's /dev/shm?), staging it through host memory")
    return "UCX found no RDMA path between the hosts (TCP fallback): check the NICs, GPUDirect RDMA and UCX_TLS"
