"""KVCacheManager: prefix hits, allocation for new tokens, freeing, under random sequences of operations.

The state machine keeps a shadow of what each block's KV holds (the token written at
each slot), written only when a request "computes" its tokens. That lets it check
what matters for correctness: a request only ever reads KV of its own tokens, a
block someone else uses or that the cache vouches for is never written, and a hit
holds exactly the tokens it is a hit for.
"""
from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from splitserve.engine.block_pool import BlockPool
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.request import Request
from splitserve.engine.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=64)
# Prompts start from a few shared prefixes so that prefix hits happen often.
PREFIXES = ([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5, 5, 5])
prompts = st.builds(
    lambda prefix, cut, tail: prefix[:cut] + tail,
    st.sampled_from(PREFIXES),
    st.integers(0, 9),
    st.lists(st.integers(0, 3), max_size=6),
).filter(bool)


def make_manager(num_blocks: int, block_size: int) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks), block_size)


def test_hits_are_full_blocks_of_a_computed_prefix_and_leave_a_token_to_compute():
    kv = make_manager(8, 4)
    first = Request("a", list(range(10)), PARAMS)
    assert kv.get_computed_blocks(first) == ([], 0)
    kv.allocate_slots(first, 10)
    assert kv.get_computed_blocks(Request("x", list(range(10)), PARAMS)) == ([], 0)  # KV not computed yet
    first.num_computed_tokens = 10
    kv.cache_blocks(first)

    same = Request("b", list(range(8)), PARAMS)  # two full blocks, but one token must stay to compute
    hits, num_tokens = kv.get_computed_blocks(same)
    assert [b.block_id for b in hits] == kv.get_block_ids("a")[:1] and num_tokens == 4
    longer = Request("c", list(range(12)), PARAMS)
    hits, num_tokens = kv.get_computed_blocks(longer)
    assert [b.block_id for b in hits] == kv.get_block_ids("a")[:2] and num_tokens == 8
    other = Request("d", [0, 1, 2, 3, 4, 5, 6, 99, 8], PARAMS)  # differs inside block 2
    assert kv.get_computed_blocks(other)[1] == 4


def test_allocate_counts_hits_that_sit_in_the_free_queue():
    kv = make_manager(4, 2)
    first = Request("a", [1, 2, 3, 4, 5], PARAMS)
    kv.allocate_slots(first, 5)  # 3 blocks
    first.num_computed_tokens = 5
    kv.cache_blocks(first)
    kv.free(first)
    assert kv.num_free_blocks == 4
    second = Request("b", [1, 2, 3, 4, 7, 7, 7, 7, 7], PARAMS)
    hits, n = kv.get_computed_blocks(second)
    assert n == 4
    # 9 tokens need 5 blocks: the 2 hits (free, cached) and 3 new ones, 4 blocks in all.
    assert kv.allocate_slots(second, 5, hits) is None
    assert kv.num_free_blocks == 4 and all(b.ref_cnt == 0 for b in kv.block_pool.blocks)
    assert len(kv.allocate_slots(second, 3, hits)) == 2  # 7 tokens: the 2 hits and 2 new blocks
    assert kv.get_block_ids("b")[:2] == [b.block_id for b in hits]


def test_free_is_idempotent():
    kv = make_manager(4, 2)
    request = Request("a", [1, 2, 3], PARAMS)
    kv.allocate_slots(request, 3)
    kv.free(request)
    kv.free(request)
    assert kv.num_free_blocks == 4 and kv.num_requests == 0


class KVCacheManagerMachine(RuleBasedStateMachine):
    """Requests arrive, compute their tokens in chunks, decode, get preempted, fail KV loads (quarantining
    blocks) and finish, on a small pool."""

    def __init__(self) -> None:
        super().__init__()
        self.next_id = 0
        self.requests: dict[str, Request] = {}
        self.pending: dict[str, int] = {}  # tokens allocated for but not computed yet
        self.shadow: dict[int, dict[int, int]] = {}  # block id -> {slot: token id whose KV is there}
        self.quarantined: set[int] = set()  # blocks a failed transfer may still write into

    @initialize(num_blocks=st.integers(3, 12), block_size=st.sampled_from([1, 2, 4]))
    def setup(self, num_blocks, block_size):
        self.kv = make_manager(num_blocks, block_size)
        self.pool = self.kv.block_pool
        self.block_size = block_size

    # -- helpers ---------------------------------------------------------------

    def blocks_of(self, request_id: str):
        return self.kv.req_to_blocks.get(request_id, [])

    def snapshot(self):
        return [b.ref_cnt for b in self.pool.blocks], self.pool.num_free_blocks, dict(self.kv.req_to_blocks)

    def admit(self, request: Request, chunk: int) -> None:
        """What the scheduler does for a waiting request: look up hits, allocate a first chunk."""
        hits, num_hit_tokens = self.kv.get_computed_blocks(request)
        assert num_hit_tokens == len(hits) * self.block_size < request.num_tokens
        for i, block in enumerate(hits):
            expected = request.all_token_ids[i * self.block_size : (i + 1) * self.block_size]
            assert block.token_ids == tuple(expected)
            assert [self.shadow[block.block_id][j] for j in range(self.block_size)] == expected
        num_new = min(chunk, request.num_tokens - num_hit_tokens)
        before = self.snapshot()
        held = {b.block_id for blocks in self.kv.req_to_blocks.values() for b in blocks} | self.quarantined
        new_blocks = self.kv.allocate_slots(request, num_new, hits)
        num_needed = self.kv.num_blocks_for(num_hit_tokens + num_new) - len(hits)
        num_free_hits = sum(b.ref_cnt == 0 for b in hits) if new_blocks is None else 0
        if new_blocks is None:
            assert num_needed > before[1] - num_free_hits, "refused although it fits"
            assert self.snapshot() == before
            return
        assert len(new_blocks) == num_needed
        for block in new_blocks:
            assert block.block_id not in held, f"{block} handed out while in use"
            assert block.ref_cnt == 1 and block.block_hash is None
            self.shadow[block.block_id] = {}  # fresh block: whatever it held is garbage now
        request.num_computed_tokens = num_hit_tokens
        self.requests[request.request_id] = request
        self.pending[request.request_id] = num_new

    # -- rules -------------------------------------------------------------------

    @rule(prompt=prompts, chunk=st.integers(1, 12))
    def add(self, prompt, chunk):
        request = Request(f"r{self.next_id}", prompt, PARAMS)
        self.next_id += 1
        self.admit(request, chunk)

    @precondition(lambda self: any(self.pending.values()))
    @rule(data=st.data())
    def compute(self, data):
        """The model runs: writes the KV of the pending tokens, then full blocks enter the cache."""
        request_id = data.draw(st.sampled_from(sorted(r for r, n in self.pending.items() if n)))
        request, blocks = self.requests[request_id], self.blocks_of(request_id)
        start = request.num_computed_tokens
        for pos in range(start, start + self.pending[request_id]):
            block = blocks[pos // self.block_size]
            assert block.ref_cnt == 1, f"writing into {block}, which another request reads"
            assert block.block_hash is None, f"writing into {block}, which the prefix cache vouches for"
            self.shadow[block.block_id][pos % self.block_size] = request.all_token_ids[pos]
        request.num_computed_tokens += self.pending[request_id]
        self.pending[request_id] = 0
        self.kv.cache_blocks(request)

    @precondition(lambda self: any(n == 0 for n in self.pending.values()))
    @rule(data=st.data(), chunk=st.integers(1, 12), token=st.integers(0, 3))
    def extend(self, data, chunk, token):
        """The next chunk of a prompt, or (all computed) one decoded token."""
        request_id = data.draw(st.sampled_from(sorted(r for r, n in self.pending.items() if n == 0)))
        request = self.requests[request_id]
        if request.num_computed_tokens == request.num_tokens:
            request.append_output(token)
        num_new = min(chunk, request.num_tokens - request.num_computed_tokens)
        before = self.snapshot()
        held_by_others = {b.block_id for r, bl in self.kv.req_to_blocks.items() if r != request_id for b in bl}
        held_by_others |= self.quarantined
        new_blocks = self.kv.allocate_slots(request, num_new)
        if new_blocks is None:
            assert self.snapshot() == before
            return
        for block in new_blocks:
            assert block.block_id not in held_by_others and block.ref_cnt == 1
            self.shadow[block.block_id] = {}
        assert len(self.blocks_of(request_id)) == self.kv.num_blocks_for(request.num_computed_tokens + num_new)
        self.pending[request_id] = num_new

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), twice=st.booleans())
    def finish(self, data, twice):
        request_id = data.draw(st.sampled_from(sorted(self.requests)))
        request = self.requests.pop(request_id)
        del self.pending[request_id]
        self.kv.free(request)
        if twice:
            self.kv.free(request)

    @precondition(lambda self: any(self.pending.values()))
    @rule(data=st.data())
    def fail_load_with_quarantine(self, data):
        """A KV transfer into the request's new blocks failed late: they are held back, the request is freed."""
        request_id = data.draw(st.sampled_from(sorted(r for r, n in self.pending.items() if n)))
        request = self.requests.pop(request_id)
        del self.pending[request_id]
        fresh = [b.block_id for b in self.blocks_of(request_id) if b.ref_cnt == 1 and b.block_hash is None]
        quarantine = frozenset(data.draw(st.lists(st.sampled_from(fresh), unique=True)) if fresh else [])
        self.kv.free(request, quarantine)
        self.quarantined |= quarantine
        for block_id in quarantine:
            self.shadow[block_id] = {}  # a late write may land there: its KV is garbage

    @precondition(lambda self: self.quarantined)
    @rule(data=st.data())
    def release_quarantine(self, data):
        block_ids = data.draw(st.lists(st.sampled_from(sorted(self.quarantined)), min_size=1, unique=True))
        self.kv.free_quarantined(block_ids + [10_000])  # an unknown id is ignored
        self.quarantined -= set(block_ids)

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), chunk=st.integers(1, 12))
    def preempt_and_readmit(self, data, chunk):
        """Freed and recomputed from scratch, outputs included; its own cached blocks may come back as hits."""
        request_id = data.draw(st.sampled_from(sorted(self.requests)))
        request = self.requests.pop(request_id)
        del self.pending[request_id]
        self.kv.free(request)
        request.num_computed_tokens = 0
        self.admit(request, chunk)

    # -- invariants --------------------------------------------------------------

    @invariant()
    def ref_counts_match_holders(self):
        if not hasattr(self, "kv"):
            return
        holders: dict[int, int] = {}
        for blocks in self.kv.req_to_blocks.values():
            assert len({b.block_id for b in blocks}) == len(blocks), "a request holds a block twice"
            for b in blocks:
                holders[b.block_id] = holders.get(b.block_id, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_cnt == holders.get(block.block_id, 0) + (block.block_id in self.quarantined)
        assert set(self.kv.quarantined) == self.quarantined
        assert self.pool.num_free_blocks == sum(b.ref_cnt == 0 for b in self.pool.blocks)
        assert set(self.kv.req_to_blocks) == set(self.requests)

    @invariant()
    def requests_read_only_their_own_tokens(self):
        for request_id, request in self.requests.items():
            blocks = self.blocks_of(request_id)
            need = request.num_computed_tokens + self.pending[request_id]
            assert len(blocks) >= self.kv.num_blocks_for(need)
            for pos in range(request.num_computed_tokens):
                block = blocks[pos // self.block_size]
                assert self.shadow[block.block_id].get(pos % self.block_size) == request.all_token_ids[pos]

    @invariant()
    def cached_blocks_hold_their_tokens(self):
        if not hasattr(self, "kv"):
            return
        for block_hash, block in self.pool.cached.items():
            assert block.block_hash == block_hash
            assert tuple(self.shadow[block.block_id].get(j) for j in range(self.block_size)) == block.token_ids

    def teardown(self):
        if not hasattr(self, "kv"):
            return
        for request in self.requests.values():
            self.kv.free(request)
        self.kv.free_quarantined(sorted(self.quarantined))
        assert self.kv.num_requests == 0 and not self.kv._num_cached_blocks
        assert all(b.ref_cnt == 0 for b in self.pool.blocks)
        assert self.pool.num_free_blocks == self.pool.num_blocks


TestKVCacheManagerMachine = KVCacheManagerMachine.TestCase
TestKVCacheManagerMachine.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


@pytest.mark.parametrize("block_size", [1, 3])
def test_block_ids_follow_token_positions(block_size):
    kv = make_manager(16, block_size)
    request = Request("a", list(range(7)), PARAMS)
    kv.allocate_slots(request, 7)
    assert len(kv.get_block_ids("a")) == kv.num_blocks_for(7)
    request.num_computed_tokens = 7
    request.append_output(1)
    kv.allocate_slots(request, 1)
    assert len(kv.get_block_ids("a")) == kv.num_blocks_for(8)
