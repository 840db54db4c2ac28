"""A peer that dies, stalls or restarts: the other side fails fast or at its deadline,
never hangs, and gets every block back."""
from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
import torch
from kv_peer import LAYOUT, kv_pattern
from splitserve.kvtransfer import (
    KVTransferAgent,
    PeerDisconnectedError,
    TransferTimeoutError,
)


def _stopped(peer) -> None:
    """SIGSTOPs the peer and returns once it is stopped (state T), so that it answers nothing after."""
    peer.signal(signal.SIGSTOP)
    deadline = time.monotonic() + 10.0
    while Path(f"/proc/{peer.pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
        assert time.monotonic() < deadline, f"{peer.name} did not stop"
        time.sleep(0.005)


def _reclaim_within(agent: KVTransferAgent, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    blocks: list[int] = []
    while time.monotonic() < deadline and agent.num_blocks_in_doubt:
        blocks += agent.reclaim()
        time.sleep(0.01)
    return sorted(blocks + agent.reclaim())


def test_peer_killed_before_read_fails_fast_and_restart_is_readded(start_peer, local_agent):
    old = start_peer("prefill-r", seed=11)
    local_agent.add_peer("prefill-r", old.metadata, LAYOUT)
    local_agent.read_blocks("prefill-r", [1], [1], timeout=10.0)  # connected
    old.kill()

    started = time.monotonic()
    with pytest.raises(PeerDisconnectedError, match="prefill-r"):
        local_agent.read_blocks("prefill-r", [2, 3], [2, 3], timeout=5.0)
    assert time.monotonic() - started < 1.0
    assert local_agent.num_blocks_in_doubt == 0

    new = start_peer("prefill-r", seed=12)  # same name, new agent, new metadata
    local_agent.add_peer("prefill-r", new.metadata, LAYOUT)
    local_agent.read_blocks("prefill-r", [2, 3], [2, 3], timeout=10.0)
    assert torch.equal(local_agent._kv_cache[[2, 3]], kv_pattern(12)[[2, 3]])


def test_peer_killed_during_read_fails_fast(start_peer, local_agent):
    peer = start_peer("prefill-k")
    local_agent.add_peer("prefill-k", peer.metadata, LAYOUT)
    peer.signal(signal.SIGSTOP)  # the read stays in flight until the peer is killed

    async def read_then_kill() -> float:
        task = asyncio.create_task(
            local_agent.read_blocks_async("prefill-k", [4, 5], [4, 5], timeout=30.0))
        await asyncio.sleep(0.3)
        assert not task.done()
        peer.kill()
        killed = time.monotonic()
        with pytest.raises(PeerDisconnectedError, match="prefill-k"):
            await task
        return time.monotonic() - killed

    assert asyncio.run(read_then_kill()) < 5.0
    assert local_agent.num_blocks_in_doubt == 0


def test_peer_stopped_mid_read_hits_the_deadline_and_blocks_come_back(start_peer, local_agent):
    peer = start_peer("prefill-s", seed=5)
    # Stopped before it is added: connecting needs the peer to answer, and a peer still running
    # just after add_peer may answer UCX's connection set-up at once. (Once connected, small
    # reads of a stopped peer's host memory still finish: CMA copies them without it.)
    _stopped(peer)
    local_agent.add_peer("prefill-s", peer.metadata, LAYOUT)

    started = time.monotonic()
    with pytest.raises(TransferTimeoutError) as err:
        local_agent.read_blocks("prefill-s", [8, 9, 10], [20, 21, 22], timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 3.0
    assert err.value.blocks_in_doubt == (20, 21, 22)
    assert local_agent.num_blocks_in_doubt == 3
    time.sleep(0.2)
    assert local_agent.reclaim() == []  # still stopped: the copy may yet land

    peer.signal(signal.SIGCONT)
    assert _reclaim_within(local_agent, 5.0) == [20, 21, 22]
    # Why the blocks were held: the given-up copy did land once the peer resumed.
    assert torch.equal(local_agent._kv_cache[[20, 21, 22]], kv_pattern(5)[[8, 9, 10]])
    local_agent.read_blocks("prefill-s", [11], [23], timeout=10.0)  # healthy again


@pytest.mark.parametrize("then", ["kill", "remove"])
def test_stopped_peer_killed_or_removed_releases_blocks_in_doubt(start_peer, local_agent, then):
    peer = start_peer(f"prefill-{then}")
    _stopped(peer)  # before add_peer: never connected, so the read cannot finish (see above)
    local_agent.add_peer(peer.name, peer.metadata, LAYOUT)
    with pytest.raises(TransferTimeoutError):
        local_agent.read_blocks(peer.name, [1, 2], [30, 31], timeout=0.3)

    if then == "kill":
        peer.kill()
    else:
        local_agent.remove_peer(peer.name)

    assert _reclaim_within(local_agent, 5.0) == [30, 31]
    assert local_agent.num_blocks_in_doubt == 0
