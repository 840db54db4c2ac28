"""Reads over CUDA IPC between two processes on one GPU: byte-exact, head slices, the probe, a missed deadline."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch
from kv_peer import LAYOUT, NUM_BLOCKS, kv_pattern
from splitserve.kvtransfer import KVTransferAgent, TransferTimeoutError
from splitserve.kvtransfer.descriptors import HeadSlice
from splitserve.kvtransfer.paths import CUDA_IPC, NIXL

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SEED = 5


@pytest.fixture
def gpu_agent():
    kv = torch.zeros(NUM_BLOCKS, LAYOUT.num_kv_heads, LAYOUT.num_layers, 2, LAYOUT.block_size, LAYOUT.head_dim,
                     dtype=torch.float16, device="cuda")
    agent = KVTransferAgent("decode-gpu", kv, LAYOUT)
    yield agent
    agent.close()


def test_a_peer_on_the_same_gpu_is_read_over_cuda_ipc_byte_exact(gpu_agent, start_peer):
    peer = start_peer("prefill-gpu", SEED, device="cuda")
    gpu_agent.add_peer("prefill-gpu", peer.metadata, LAYOUT)
    assert gpu_agent.path("prefill-gpu") == CUDA_IPC
    remote, local = [3, 4, 5, 9, 40], [10, 11, 12, 2, 41]
    result = gpu_agent.read_blocks("prefill-gpu", remote, local, timeout=10.0)
    assert result.num_bytes == len(remote) * LAYOUT.block_bytes
    expected = torch.zeros_like(gpu_agent._kv_cache.cpu())
    expected[local] = kv_pattern(SEED)[remote]
    assert torch.equal(gpu_agent._kv_cache.cpu(), expected)

    asyncio.run(gpu_agent.read_blocks_async("prefill-gpu", [1], [0], timeout=10.0, heads=HeadSlice(0, 0, 1, 1)))
    assert torch.equal(gpu_agent._kv_cache[0, 1].cpu(), kv_pattern(SEED)[1, 0])  # its head 0 into our head 1

    probe = asyncio.run(gpu_agent.probe("prefill-gpu", timeout=10.0))
    assert probe.num_bytes == NUM_BLOCKS * LAYOUT.block_bytes


def test_cuda_ipc_turned_off_reads_over_nixl(start_peer):
    peer = start_peer("prefill-gpu-nixl", SEED, device="cuda")
    kv = torch.zeros(NUM_BLOCKS, LAYOUT.num_kv_heads, LAYOUT.num_layers, 2, LAYOUT.block_size, LAYOUT.head_dim,
                     dtype=torch.float16, device="cuda")
    with KVTransferAgent("decode-gpu-nixl", kv, LAYOUT, cuda_ipc=False) as agent:
        agent.add_peer("prefill-gpu-nixl", peer.metadata, LAYOUT)
        assert agent.path("prefill-gpu-nixl") == NIXL
        agent.read_blocks("prefill-gpu-nixl", [7], [8], timeout=30.0)
        assert torch.equal(kv[8].cpu(), kv_pattern(SEED)[7])


def test_a_copy_past_its_deadline_leaves_its_blocks_in_doubt_until_it_has_run(gpu_agent, start_peer):
    peer = start_peer("prefill-gpu-late", SEED, device="cuda")
    gpu_agent.add_peer("prefill-gpu-late", peer.metadata, LAYOUT)
    gpu_agent.read_blocks("prefill-gpu-late", [1], [1], timeout=10.0)  # the side stream exists now
    with torch.cuda.stream(gpu_agent._stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time: the next copy queues behind it
    with pytest.raises(TransferTimeoutError) as info:
        gpu_agent.read_blocks("prefill-gpu-late", [2, 3], [20, 21], timeout=0.0)
    assert info.value.blocks_in_doubt == (20, 21) and gpu_agent.num_blocks_in_doubt == 2
    gpu_agent.remove_peer("prefill-gpu-late")  # the copy still runs on our GPU: not settled by this
    reclaimed, deadline = [], time.monotonic() + 10
    while not reclaimed and time.monotonic() < deadline:
        reclaimed = gpu_agent.reclaim()
        time.sleep(0.01)
    assert reclaimed == [20, 21] and gpu_agent.num_blocks_in_doubt == 0
    assert torch.equal(gpu_agent._kv_cache[[20, 21]].cpu(), kv_pattern(SEED)[[2, 3]])  # it did land, late
