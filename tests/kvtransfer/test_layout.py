"""Layout checks, peer refusal and input validation: no second process needed."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from kv_peer import LAYOUT, NUM_BLOCKS
from splitserve.kvtransfer import (
    BadMetadataError,
    IncompatiblePeerError,
    InvalidBlocksError,
    KVLayout,
    KVTransferAgent,
    UnknownPeerError,
    block_bytes,
)

MISMATCHED = {
    "model": "other-model",
    "dtype": "bfloat16",
    "kv_scales": "0123456789abcdef",  # an fp8 cache's K/V scales differ: its blocks would be misread
    "block_size": 16,
    "layout": "layer_major",
    "tp_size": 2,
    "num_layers": 3,
    "head_dim": 128,
    "num_kv_heads": 4,
}


def test_layout_from_kv_cache_and_block_bytes():
    kv = torch.zeros(NUM_BLOCKS, 2, 2, 2, 4, 64, dtype=torch.float16)  # [blocks, heads, layers, K/V, block, dim]
    layout = KVLayout.from_kv_cache(kv, model="tiny")
    assert layout == LAYOUT
    assert layout.block_bytes == block_bytes(kv) == 4096
    # block b is one contiguous range at b * block_bytes
    assert kv[5].data_ptr() - kv.data_ptr() == 5 * layout.block_bytes


@pytest.mark.parametrize(("field", "value"), MISMATCHED.items())
def test_incompatible_peer_is_refused_naming_the_field(local_agent, field, value):
    peer_layout = dataclasses.replace(LAYOUT, **{field: value})
    with pytest.raises(IncompatiblePeerError, match=rf"'prefill-x'.*\b{field}\b") as err:
        local_agent.add_peer("prefill-x", b"never decoded", peer_layout)
    assert set(err.value.mismatches) == {field}
    assert local_agent.peers == frozenset()


def test_every_mismatched_field_is_named():
    peer_layout = dataclasses.replace(LAYOUT, tp_rank=1, **MISMATCHED)
    with pytest.raises(IncompatiblePeerError) as err:
        LAYOUT.check_compatible(peer_layout, "p")
    assert set(err.value.mismatches) == set(MISMATCHED)  # ranks may differ: each side names its own
    for field in MISMATCHED:
        assert field in str(err.value)


def test_unknown_peer_and_bad_metadata(local_agent):
    with pytest.raises(UnknownPeerError):
        local_agent.read_blocks("nobody", [1], [1], timeout=1.0)
    with pytest.raises(BadMetadataError, match="too short|magic"):
        local_agent.add_peer("someone", b"garbage", LAYOUT)
    kv = torch.zeros_like(local_agent._kv_cache)
    with KVTransferAgent("the-real-name", kv, LAYOUT) as other:
        with pytest.raises(BadMetadataError, match="names agent 'the-real-name'"):
            local_agent.add_peer("someone", other.metadata(), LAYOUT)
    assert local_agent.peers == frozenset()


def test_block_ids_are_validated():
    from splitserve.kvtransfer.descriptors import check_block_ids

    with pytest.raises(InvalidBlocksError, match="length|remote block ids but"):
        check_block_ids([1, 2], [1], 64, 64)
    with pytest.raises(InvalidBlocksError, match="outside"):
        check_block_ids([64], [0], 64, 64)
    with pytest.raises(InvalidBlocksError, match="repeat"):
        check_block_ids([1, 2], [3, 3], 64, 64)
