"""Real NIXL agents (UCX over host memory) in separate processes.

UCX needs no settings for two processes on one machine: its default transports pick
CMA for host memory and TCP on loopback for control. (``UCX_TLS=sm``/``shm`` alone makes
backend creation fail.)
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
from kv_peer import LAYOUT, NUM_BLOCKS, PeerProcess
from splitserve.kvtransfer import KVTransferAgent

_names = itertools.count()


@pytest.fixture
def local_agent() -> Iterator[KVTransferAgent]:
    """The decode side in this process: an empty cache of the peers' layout."""
    kv = torch.zeros(NUM_BLOCKS, LAYOUT.num_kv_heads, LAYOUT.num_layers, 2,
                     LAYOUT.block_size, LAYOUT.head_dim, dtype=torch.float16)
    agent = KVTransferAgent(f"decode-{next(_names)}", kv, LAYOUT)
    yield agent
    agent.close()


@pytest.fixture
def start_peer() -> Iterator:
    """start_peer(name, seed) -> PeerProcess; every peer is killed at teardown."""
    started: list[PeerProcess] = []

    def start(name: str, seed: int = 1, device: str = "cpu") -> PeerProcess:
        peer = PeerProcess(name, seed, device)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.kill()
