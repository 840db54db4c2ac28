"""Turning block-id pairs into the fewest byte ranges NIXL has to move.

Descriptor count, not bandwidth, bounds a KV transfer (~6 us of fixed cost per descriptor
measured on H200s), so runs of blocks that are consecutive on *both* sides become one
descriptor. Pure functions; the agent turns spans into NIXL descriptor lists.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from splitserve.kvtransfer.errors import InvalidBlocksError


class Run(NamedTuple):
    """``num_blocks`` consecutive blocks from ``remote_block_id`` <-> from ``local_block_id``."""

    remote_block_id: int
    local_block_id: int
    num_blocks: int


class Span(NamedTuple):
    """One descriptor pair: ``length`` bytes at these offsets from each side's cache base."""

    remote_offset: int
    local_offset: int
    length: int


def check_block_ids(
    remote_block_ids: Sequence[int],
    local_block_ids: Sequence[int],
    num_remote_blocks: int,
    num_local_blocks: int,
) -> None:
    """Raises InvalidBlocksError unless the lists pair up one to one and lie in range."""
    if len(remote_block_ids) != len(local_block_ids):
        raise InvalidBlocksError(
            f"{len(remote_block_ids)} remote block ids but {len(local_block_ids)} local ones"
        )
    for side, ids, limit in (
        ("remote", remote_block_ids, num_remote_blocks),
        ("local", local_block_ids, num_local_blocks),
    ):
        bad = [b for b in ids if not 0 <= b < limit]
        if bad:
            raise InvalidBlocksError(f"{side} block ids {bad[:8]} are outside [0, {limit})")
        if len(set(ids)) != len(ids):
            raise InvalidBlocksError(f"{side} block ids repeat: {list(ids)[:16]}")


def coalesce(remote_block_ids: Sequence[int], local_block_ids: Sequence[int]) -> list[Run]:
    """The fewest runs covering the pairs (remote_block_ids[i], local_block_ids[i]).

    Two pairs can share a run only if both ids step by one, so after sorting by remote id
    (ids are unique) a run is a maximal stretch of neighbours; greedy merging is optimal.
    """
    runs: list[Run] = []
    for remote, local in sorted(zip(remote_block_ids, local_block_ids)):
        if runs:
            last = runs[-1]
            if (remote == last.remote_block_id + last.num_blocks
                    and local == last.local_block_id + last.num_blocks):
                runs[-1] = last._replace(num_blocks=last.num_blocks + 1)
                continue
        runs.append(Run(remote, local, 1))
    return runs


def runs_to_spans(runs: Sequence[Run], block_bytes: int) -> list[Span]:
    return [
        Span(r.remote_block_id * block_bytes, r.local_block_id * block_bytes, r.num_blocks * block_bytes)
        for r in runs
    ]


class HeadSlice(NamedTuple):
    """``num_heads`` consecutive KV heads: from head ``remote_head`` of the peer's cache of rank
    ``remote_rank`` to head ``local_head`` of ours (head indices count within each cache)."""

    remote_rank: int
    remote_head: int
    local_head: int
    num_heads: int


def head_slice_spans(
    runs: Sequence[Run], heads: HeadSlice, remote_block_bytes: int, local_block_bytes: int, head_bytes: int
) -> list[Span]:
    """Spans that copy ``heads`` of every block of ``runs``.

    Heads are outermost inside a block, so a head range of one block is one contiguous
    span. A run of blocks stays one span only when the slice is the whole block on both
    sides; otherwise each block is its own span (a strided copy NIXL cannot express).
    """
    length = heads.num_heads * head_bytes
    if length == remote_block_bytes == local_block_bytes:
        return runs_to_spans(runs, remote_block_bytes)
    remote_start, local_start = heads.remote_head * head_bytes, heads.local_head * head_bytes
    return [
        Span((r.remote_block_id + i) * remote_block_bytes + remote_start, (r.local_block_id + i) * local_block_bytes + local_start, length)
        for r in runs
        for i in range(r.num_blocks)
    ]
