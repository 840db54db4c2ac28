"""Blocks move byte-exact between two processes, coalesced, with completion notified."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import torch
from kv_peer import LAYOUT, AddPeer, GetBlocks, Grant, PeerProcess, Pump, kv_pattern
from splitserve.kvtransfer import KVTransferAgent

PREFILL_SEED = 7


@pytest.fixture(scope="module")
def prefill() -> Iterator[PeerProcess]:
    """One prefill process for the module: its cache holds kv_pattern(PREFILL_SEED)."""
    peer = PeerProcess("prefill", PREFILL_SEED)
    yield peer
    peer.kill()


@pytest.fixture
def decode(local_agent: KVTransferAgent, prefill: PeerProcess) -> KVTransferAgent:
    local_agent.add_peer("prefill", prefill.metadata, LAYOUT)
    return local_agent


def _cache(agent: KVTransferAgent) -> torch.Tensor:
    return agent._kv_cache  # the test owns the tensor it handed in


@pytest.mark.parametrize(
    ("remote", "local", "num_descriptors"),
    [
        ([3, 4, 5, 6], [10, 11, 12, 13], 1),  # one run on both sides
        ([1, 7, 20, 21, 40], [50, 2, 30, 31, 9], 4),  # 20,21 -> 30,31 merge
        ([8, 9, 10, 11], [11, 10, 9, 8], 4),  # contiguous remotely, reversed locally
        (list(range(64)), list(range(64)), 1),  # the whole cache
    ],
)
def test_read_lands_byte_exact_in_the_right_blocks(decode, remote, local, num_descriptors):
    result = decode.read_blocks("prefill", remote, local, timeout=10.0)

    expected = torch.zeros_like(_cache(decode))
    expected[local] = kv_pattern(PREFILL_SEED)[remote]
    assert torch.equal(_cache(decode).view(torch.uint8), expected.view(torch.uint8))
    assert (result.op, result.num_blocks, result.num_descriptors) == ("READ", len(remote), num_descriptors)
    assert result.num_bytes == len(remote) * LAYOUT.block_bytes


def test_read_async_lands_byte_exact(decode):
    result = asyncio.run(decode.read_blocks_async("prefill", [30, 31, 2], [0, 1, 5], timeout=10.0))

    assert result.num_descriptors == 2
    assert torch.equal(_cache(decode)[[0, 1, 5]], kv_pattern(PREFILL_SEED)[[30, 31, 2]])


def test_write_lands_byte_exact_in_the_peers_blocks(start_peer, local_agent):
    target = start_peer("decode-target", seed=0)  # an empty cache to push into
    local_agent.add_peer("decode-target", target.metadata, LAYOUT)
    _cache(local_agent).copy_(kv_pattern(3))

    result = local_agent.write_blocks("decode-target", [5, 6, 7, 60], [0, 1, 2, 9],
                                      notify=b"req-w", timeout=10.0)

    assert (result.op, result.num_descriptors) == ("WRITE", 2)
    landed = target.call(GetBlocks([5, 6, 7, 60, 8]))
    assert torch.equal(landed[:4], kv_pattern(3)[[0, 1, 2, 9]])
    assert not landed[4].any()  # the block after the run is untouched
    notes, _, _ = target.call(Pump(want=1, timeout=5.0))
    assert notes == [(local_agent.name, b"req-w")]


def test_read_notification_lets_prefill_release_its_lease(decode, prefill):
    prefill.call(Grant("req-1", [12, 13, 14], ttl=30.0))
    prefill.call(Grant("req-2", [15], ttl=0.2))  # decode never reads this one

    decode.read_blocks("prefill", [12, 13, 14], [0, 1, 2], notify=b"req-1", timeout=10.0)
    notes, freed, num_pinned = prefill.call(Pump(want=1, timeout=5.0))

    assert notes == [(decode.name, b"req-1")]
    assert freed == [12, 13, 14]
    assert num_pinned == 1  # req-2 still leased until it expires
    time.sleep(0.25)
    _, freed, num_pinned = prefill.call(Pump(want=0, timeout=0.0))
    assert (freed, num_pinned) == ([15], 0)


def test_same_metadata_again_is_a_no_op(decode, prefill):
    decode.add_peer("prefill", prefill.metadata, LAYOUT)

    decode.read_blocks("prefill", [1], [1], timeout=10.0)
    assert decode.peers == frozenset({"prefill"})


def test_decode_metadata_reaches_prefill(decode, prefill):
    # The handshake runs both ways in the services; adding the decode side must not disturb
    # the prefill side's view of it or its pending notifications.
    prefill.call(AddPeer(decode.name, decode.metadata(), LAYOUT))
    decode.read_blocks("prefill", [2], [3], notify=b"after-handshake", timeout=10.0)
    notes, _, _ = prefill.call(Pump(want=1, timeout=5.0))
    assert notes == [(decode.name, b"after-handshake")]
