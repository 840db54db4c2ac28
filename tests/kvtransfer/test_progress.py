"""Every agent's NIXL progress thread gets a poll delay, so it sleeps until UCX signals instead
of spinning a core (the nixl API's own delay is 0); SPLITSERVE_NIXL_PROGRESS_DELAY_US overrides it."""
from __future__ import annotations

import nixl._api as api
import pytest
import torch
from kv_peer import LAYOUT, NUM_BLOCKS
from splitserve.kvtransfer import KVTransferAgent
from splitserve.kvtransfer.progress import PROGRESS_DELAY_US


@pytest.fixture
def delays(monkeypatch) -> list[int]:
    """The progress-thread delay of each agent the bindings create."""
    seen: list[int] = []
    create = api.nixlBind.nixlAgent

    def recording(name, config):
        seen.append(config.pthrDelay)
        return create(name, config)

    monkeypatch.setattr(api.nixlBind, "nixlAgent", recording)
    return seen


def make_agent(name: str) -> KVTransferAgent:
    kv = torch.zeros(NUM_BLOCKS, LAYOUT.num_kv_heads, LAYOUT.num_layers, 2, LAYOUT.block_size, LAYOUT.head_dim, dtype=torch.float16)
    return KVTransferAgent(name, kv, LAYOUT)


def test_an_agent_gets_the_progress_delay_and_the_api_is_left_as_it_was(delays):
    bindings = api.nixlBind
    make_agent("progress-default").close()
    assert delays == [PROGRESS_DELAY_US] and PROGRESS_DELAY_US >= 1000
    assert api.nixlBind is bindings  # only agents made by splitserve get it, and only while made


def test_the_delay_can_be_overridden(delays, monkeypatch):
    monkeypatch.setenv("SPLITSERVE_NIXL_PROGRESS_DELAY_US", "0")
    make_agent("progress-spin").close()
    assert delays == [0]
