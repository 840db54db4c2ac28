"""The per-peer path choice: CUDA IPC between GPUs of one host, NIXL for everything else.

The choice is tested here with regions and exports as peers describe them (host memory on
this machine); the CUDA IPC copies themselves run in test_cuda_ipc.py, on a GPU.
"""
from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from kv_peer import LAYOUT, NUM_BLOCKS, kv_pattern
from splitserve.kvtransfer import BadMetadataError, KVTransferAgent
from splitserve.kvtransfer.cuda_ipc import IpcExport, host_id
from splitserve.kvtransfer.metadata import AgentMetadata, CacheRegion
from splitserve.kvtransfer.paths import CUDA_IPC, NIXL, choose_path, slow_path_cause

VRAM = CacheRegion("VRAM", 0, 0x7F0000000000, 64, 4096)
DRAM = CacheRegion("DRAM", 0, 0x7F0000000000, 64, 4096)
EXPORT = IpcExport(host_id="boot-a", device_uuid="GPU-0", handle=b"\x01" * 64, storage_size=262144, storage_offset=0,
                   ref_counter_handle=b"/torch_1", ref_counter_offset=0, event_handle=b"\x02" * 64,
                   event_sync_required=True, cache_offset=0, num_bytes=262144)
GPUS_HERE = {"GPU-0": 0, "GPU-1": 1}.get  # what local_device_of finds on a host with two GPUs


def test_gpus_of_one_host_read_over_cuda_ipc_the_same_gpu_included():
    assert choose_path(VRAM, EXPORT, VRAM, EXPORT, GPUS_HERE) == CUDA_IPC  # the same GPU
    other_gpu = dataclasses.replace(EXPORT, device_uuid="GPU-1")
    assert choose_path(VRAM, EXPORT, VRAM, other_gpu, GPUS_HERE) == CUDA_IPC


@pytest.mark.parametrize(
    ("ours", "our_export", "theirs", "their_export", "why"),
    [
        (DRAM, None, DRAM, None, "host memory on both sides (a CPU-only machine)"),
        (VRAM, EXPORT, DRAM, None, "the peer's cache is in host memory"),
        (DRAM, None, VRAM, EXPORT, "ours is in host memory"),
        (VRAM, EXPORT, VRAM, dataclasses.replace(EXPORT, host_id="boot-b"), "another host"),
        (VRAM, EXPORT, VRAM, dataclasses.replace(EXPORT, device_uuid="GPU-7"), "a GPU this process cannot see"),
        (VRAM, None, VRAM, EXPORT, "CUDA IPC turned off here"),
        (VRAM, EXPORT, VRAM, None, "the peer exported nothing"),
    ],
)
def test_everything_else_reads_over_nixl(ours, our_export, theirs, their_export, why):
    assert choose_path(ours, our_export, theirs, their_export, GPUS_HERE) == NIXL, why


def test_a_slow_path_is_explained_by_what_it_is():
    assert "cuda_ipc" in slow_path_cause(NIXL, VRAM, VRAM, same_host=True)
    assert "RDMA" in slow_path_cause(NIXL, VRAM, VRAM, same_host=False)
    assert "peer access" in slow_path_cause(CUDA_IPC, VRAM, VRAM, same_host=True)
    assert slow_path_cause(NIXL, DRAM, DRAM, same_host=True) is None  # no GPU: nothing to compare with


def test_metadata_carries_the_ipc_export_and_refuses_a_broken_one():
    meta = AgentMetadata(VRAM, b"nixl-bytes", EXPORT)
    assert AgentMetadata.decode(meta.encode()) == meta
    assert AgentMetadata.decode(AgentMetadata(DRAM, b"nixl-bytes").encode()).ipc is None
    broken = bytearray(meta.encode())
    start = broken.index(b"{")
    broken[start : start + 1] = b"["
    with pytest.raises(BadMetadataError, match="IPC export"):
        AgentMetadata.decode(bytes(broken))


def test_host_id_is_stable_within_a_host():
    assert host_id() and host_id() == host_id()


def test_cpu_agents_read_over_nixl_and_probe_the_path(local_agent, start_peer):
    peer = start_peer("prefill-probe", seed=3)
    local_agent.add_peer("prefill-probe", peer.metadata, LAYOUT)
    assert local_agent.path("prefill-probe") == NIXL
    before = local_agent._kv_cache.clone()
    result = asyncio.run(local_agent.probe("prefill-probe", timeout=30.0))
    assert result.num_bytes == NUM_BLOCKS * LAYOUT.block_bytes and result.seconds > 0  # the whole (small) cache
    assert torch.equal(local_agent._kv_cache, before)  # the probe lands in scratch, never in KV blocks
    local_agent.read_blocks("prefill-probe", [5], [6], timeout=10.0)
    assert torch.equal(local_agent._kv_cache[6], kv_pattern(3)[5])
