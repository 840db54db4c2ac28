"""Coalescing: the fewest descriptors, covering exactly the per-block byte ranges."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from splitserve.kvtransfer import Run, Span, coalesce, runs_to_spans

BLOCK_BYTES = 4096


@st.composite
def block_pairs(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """Unique remote ids paired with unique local ids, often with runs on both sides."""
    n = draw(st.integers(0, 40))
    remote = draw(st.one_of(
        st.permutations(range(64)).map(lambda p: list(p[:n])),  # scattered
        st.integers(0, 64 - n).map(lambda start: list(range(start, start + n))),  # one range
    ))
    if draw(st.booleans()):
        local = draw(st.permutations(range(64)))[:n]
    else:  # the same ids shifted (wrapping): runs wherever remote has them
        shift = draw(st.integers(0, 63))
        local = [(r + shift) % 64 for r in remote]
    order = draw(st.permutations(range(n)))  # the order pairs come in is free
    return [remote[i] for i in order], [local[i] for i in order]


def _per_block(spans: list[Span]) -> list[tuple[int, int]]:
    out = []
    for s in spans:
        assert s.length % BLOCK_BYTES == 0 and s.length > 0
        for k in range(s.length // BLOCK_BYTES):
            out.append((s.remote_offset // BLOCK_BYTES + k, s.local_offset // BLOCK_BYTES + k))
    return out


@given(block_pairs())
def test_spans_cover_each_block_pair_exactly_once(pairs):
    remote, local = pairs
    spans = runs_to_spans(coalesce(remote, local), BLOCK_BYTES)
    covered = _per_block(spans)
    assert sorted(covered) == sorted(zip(remote, local))  # same bytes as one span per block
    assert sum(s.length for s in spans) == len(remote) * BLOCK_BYTES


@given(block_pairs())
def test_number_of_runs_is_minimal(pairs):
    remote, local = pairs
    pair_set = set(zip(remote, local))
    # A run can only continue from (r, l) to (r+1, l+1); every such link saves one descriptor.
    links = sum((r + 1, l + 1) in pair_set for r, l in pair_set)
    assert len(coalesce(remote, local)) == len(pair_set) - links


def test_examples():
    assert coalesce([3, 4, 5], [10, 11, 12]) == [Run(3, 10, 3)]
    assert coalesce([5, 3, 4], [12, 10, 11]) == [Run(3, 10, 3)]  # order of pairs is free
    assert coalesce([1, 2], [2, 1]) == [Run(1, 2, 1), Run(2, 1, 1)]
    assert coalesce([], []) == []
    assert runs_to_spans([Run(2, 5, 3)], 100) == [Span(200, 500, 300)]
