"""Which KV heads each rank holds, what a rank reads from a peer of another TP size, the byte
spans that takes, the compatibility check across TP sizes, and the step protocol's encoding."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from splitserve.config import CacheConfig, ModelConfig
from splitserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from splitserve.kvtransfer import BadMetadataError, IncompatiblePeerError, KVLayout, Run, Span
from splitserve.kvtransfer.descriptors import HeadSlice, head_slice_spans
from splitserve.kvtransfer.layout import kv_heads_of_rank, plan_head_slices
from splitserve.models.layers import ColumnParallelLinear, TPGroup
from splitserve.parallel import TPOptions
from splitserve.parallel import protocol as p
from splitserve.parallel.group import RankSpec


def layout(tp_size: int, tp_rank: int = 0, total: int = 4) -> KVLayout:
    return KVLayout("m", "float16", 16, 2, max(1, total // tp_size), 8, tp_size, tp_rank, total_num_kv_heads=total)


def group(tp_size: int, total: int = 4) -> list[KVLayout]:
    return [layout(tp_size, r, total) for r in range(tp_size)]


@pytest.mark.parametrize(("total", "tp_size"), [(4, 1), (4, 2), (4, 4), (8, 2), (2, 4), (1, 2), (1, 8)])
def test_ranks_hold_the_heads_the_qkv_projection_gives_them(total, tp_size):
    head_dim = 3
    for rank in range(tp_size):
        qkv = ColumnParallelLinear(5, {"k": total * head_dim}, bias=False, tp=TPGroup(rank, tp_size), unit=head_dim)
        _, start, rows = qkv.offsets["k"]
        heads = kv_heads_of_rank(total, tp_size, rank)
        assert (start // head_dim, rows // head_dim) == (heads.start, len(heads))
    # Every head is held by some rank.
    assert set().union(*(kv_heads_of_rank(total, tp_size, r) for r in range(tp_size))) == set(range(total))


def test_equal_tp_sizes_map_rank_to_rank_whole_blocks():
    for rank in range(2):
        assert plan_head_slices(layout(2, rank), group(2)) == [HeadSlice(rank, 0, 0, 2)]


def test_tp2_to_tp1_reads_half_of_each_block_from_each_rank():
    assert plan_head_slices(layout(1), group(2)) == [HeadSlice(0, 0, 0, 2), HeadSlice(1, 0, 2, 2)]


def test_tp1_to_tp2_each_rank_reads_its_half():
    assert plan_head_slices(layout(2, 0), group(1)) == [HeadSlice(0, 0, 0, 2)]
    assert plan_head_slices(layout(2, 1), group(1)) == [HeadSlice(0, 2, 0, 2)]


def test_replicated_heads_are_read_from_one_holder():
    # One KV head on 2 ranks: TP=1 reads it from rank 0 only; each rank of another TP=2 group from its peer rank.
    assert plan_head_slices(layout(1, 0, total=1), group(2, total=1)) == [HeadSlice(0, 0, 0, 1)]
    assert plan_head_slices(layout(2, 1, total=1), group(2, total=1)) == [HeadSlice(1, 0, 0, 1)]
    # Two heads over 4 ranks (each a copy of one) -> TP=1: heads 0 and 1 from ranks 0 and 2.
    assert plan_head_slices(layout(1, 0, total=2), group(4, total=2)) == [HeadSlice(0, 0, 0, 1), HeadSlice(2, 0, 1, 1)]


def test_head_slice_spans_are_one_per_block_unless_whole_blocks():
    runs = [Run(remote_block_id=4, local_block_id=10, num_blocks=3)]
    whole = head_slice_spans(runs, HeadSlice(0, 0, 0, 2), 200, 200, 100)
    assert whole == [Span(800, 2000, 600)]  # the slice is the whole block on both sides: one span per run
    # Half of each local block (TP=2 -> TP=1, second prefill rank): block-sized strides, offset by two heads.
    half = head_slice_spans(runs, HeadSlice(1, 0, 2, 2), 200, 400, 100)
    assert half == [Span(800, 4200, 200), Span(1000, 4600, 200), Span(1200, 5000, 200)]


def test_peers_of_different_tp_sizes_are_compatible_when_the_heads_agree():
    layout(1).check_compatible(layout(2, 1))
    layout(4, 3, total=2).check_compatible(layout(1, 0, total=2))


def test_peers_describing_different_models_are_refused_naming_the_fields():
    with pytest.raises(IncompatiblePeerError) as err:
        layout(1).check_compatible(layout(2, 0, total=2))  # 2 heads over 2 ranks is not our 4
    assert set(err.value.mismatches) == {"num_kv_heads", "tp_size"}
    with pytest.raises(IncompatiblePeerError) as err:
        layout(1).check_compatible(layout(2, 0, total=8))  # as many heads per rank, but 8 in all
    assert set(err.value.mismatches) == {"tp_size"}
    with pytest.raises(IncompatiblePeerError) as err:
        layout(2).check_compatible(dataclasses.replace(layout(1), head_dim=16, block_size=8))
    assert set(err.value.mismatches) == {"head_dim", "block_size"}
    with pytest.raises(BadMetadataError, match="not one whole TP group"):
        plan_head_slices(layout(1), group(2)[:1])
    with pytest.raises(ValueError, match="does not shard"):
        KVLayout("m", "float16", 16, 2, 3, 8, 2, 0, total_num_kv_heads=4)


def test_step_and_rank_spec_survive_the_wire():
    out = SchedulerOutput(
        scheduled=[ScheduledRequest("a", [1, 2, 3], 0, [7, 8], True), ScheduledRequest("b", [9], 41, [1, 2, 3], False),
                   ScheduledRequest("d", [4, 5], 2, [6], False, all_rows=True)],  # prompt logprobs: every row
        preempted_ids=["c"],
    )
    assert p.decode_step(p.encode_step(out)) == out
    spec = RankSpec(
        rank=1, world_size=2, store_port=1234, model=ModelConfig("/m", dtype=torch.bfloat16, device="cuda:1"),
        cache=CacheConfig(block_size=8, num_blocks=10), options=TPOptions(step_timeout_seconds=5.0), backend="nccl",
        agent_name="w-1234.r1", agent_model="m", env={"NCCL_SOCKET_IFNAME": "lo"},
    )
    import json

    assert RankSpec.from_message(json.loads(json.dumps(spec.to_message()))) == spec


def test_nccl_loopback_is_set_only_for_nccl():
    assert TPOptions().env_for("nccl") == {"NCCL_SOCKET_IFNAME": "lo"}
    assert TPOptions().env_for("gloo") == {}
    assert TPOptions(nccl_socket_ifname=None).env_for("nccl") == {}
