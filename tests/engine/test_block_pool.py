"""BlockPool: reference counts, the O(1) free queue, prefix-cache lookups and LRU eviction."""
from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from splitserve.engine.block_pool import BlockPool, FreeBlockQueue
from splitserve.engine.prefix_hash import hash_block_tokens


def free_queue_ids(pool: BlockPool) -> list[int]:
    """Walks the linked list head to tail, checking the back links on the way."""
    ids, node = [], pool.free_queue._head
    while node.next_free is not pool.free_queue._tail:
        nxt = node.next_free
        assert nxt is not None and nxt.prev_free is node
        ids.append(nxt.block_id)
        node = nxt
    return ids


def test_new_blocks_are_referenced_and_leave_the_free_queue():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 1 and len(set(b.block_id for b in blocks)) == 3
    with pytest.raises(RuntimeError, match="asked for 2 blocks, 1 free"):
        pool.get_new_blocks(2)
    assert pool.num_free_blocks == 1  # a refused request takes nothing


def test_double_free_is_an_error():
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free_blocks([block])
    assert pool.num_free_blocks == 2


def test_free_queue_removes_from_the_middle():
    pool = BlockPool(5)
    queue = FreeBlockQueue(pool.blocks)
    queue.remove(pool.blocks[2])
    assert queue.num_free_blocks == 4
    assert [queue.popleft().block_id for _ in range(4)] == [0, 1, 3, 4]
    with pytest.raises(RuntimeError):
        queue.popleft()
    with pytest.raises(RuntimeError, match="not in the free queue"):
        queue.remove(pool.blocks[0])


def test_cached_block_is_found_only_with_its_tokens():
    pool = BlockPool(4)
    (block,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [1, 2, 3, 4])
    pool.cache_full_block(block, h, [1, 2, 3, 4])
    assert pool.get_cached_block(h, [1, 2, 3, 4]) is block
    assert pool.get_cached_block(h, [1, 2, 3, 5]) is None  # a hash collision is not a hit
    assert pool.get_cached_block(hash_block_tokens(h, [1, 2, 3, 4]), [1, 2, 3, 4]) is None  # other parent


def test_same_content_in_two_blocks_keeps_the_first_cached():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    h = hash_block_tokens(None, [7, 7])
    pool.cache_full_block(a, h, [7, 7])
    pool.cache_full_block(b, h, [7, 7])
    assert pool.get_cached_block(h, [7, 7]) is a and b.block_hash is None


def test_touch_revives_a_freed_cached_block():
    pool = BlockPool(3)
    (block,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [5])
    pool.cache_full_block(block, h, [5])
    pool.free_blocks([block])
    assert pool.num_free_blocks == 3 and pool.get_cached_block(h, [5]) is block  # free, still cached
    pool.touch([block])
    assert block.ref_cnt == 1 and pool.num_free_blocks == 2
    pool.touch([block])  # a second request sharing it
    assert block.ref_cnt == 2 and pool.num_free_blocks == 2
    pool.free_blocks([block, block])
    assert block.ref_cnt == 0 and pool.num_free_blocks == 3


def test_eviction_is_least_recently_freed_first():
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(3)
    hashes = [hash_block_tokens(None, [i]) for i in range(3)]
    for block, h, i in zip(blocks, hashes, range(3)):
        pool.cache_full_block(block, h, [i])
    pool.free_blocks([blocks[1], blocks[0], blocks[2]])  # freed in this order
    assert free_queue_ids(pool) == [1, 0, 2]
    (new,) = pool.get_new_blocks(1)
    assert new is blocks[1] and new.block_hash is None  # evicted, and no longer findable
    assert pool.get_cached_block(hashes[1], [1]) is None
    assert pool.get_cached_block(hashes[0], [0]) is blocks[0]
    assert pool.num_evictions == 1


def test_reset_prefix_cache_keeps_blocks_in_use():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    ha, hb = hash_block_tokens(None, [1]), hash_block_tokens(None, [2])
    pool.cache_full_block(a, ha, [1])
    pool.cache_full_block(b, hb, [2])
    pool.free_blocks([a])
    assert pool.reset_prefix_cache() == [ha]
    assert pool.get_cached_block(ha, [1]) is None and pool.get_cached_block(hb, [2]) is b


def test_kv_events_record_stored_and_removed():
    pool = BlockPool(1)
    pool.record_kv_events = True
    (block,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [9])
    pool.cache_full_block(block, h, [9])
    pool.free_blocks([block])
    pool.get_new_blocks(1)  # evicts it
    assert pool.drain_kv_events() == [("stored", h), ("removed", h)]
    assert pool.drain_kv_events() == []


def test_caching_disabled_caches_nothing():
    pool = BlockPool(2, enable_caching=False)
    (block,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [1])
    pool.cache_full_block(block, h, [1])
    assert pool.get_cached_block(h, [1]) is None and block.block_hash is None


def test_num_blocks_must_be_positive():
    with pytest.raises(ValueError):
        BlockPool(0)


class BlockPoolMachine(RuleBasedStateMachine):
    """Random allocate / cache / lookup+touch / free / evict sequences against a model of who holds what."""

    NUM_BLOCKS = 8

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(self.NUM_BLOCKS)
        self.refs: list[int] = []  # one entry per reference held, by block id
        self.contents: dict[bytes, tuple[int, ...]] = {}  # hashes ever cached -> their tokens

    def held(self, block_id: int) -> int:
        return self.refs.count(block_id)

    @rule(n=st.integers(0, 4))
    def allocate(self, n):
        before = self.pool.num_free_blocks
        if n > before:
            with pytest.raises(RuntimeError):
                self.pool.get_new_blocks(n)
            assert self.pool.num_free_blocks == before
            return
        blocks = self.pool.get_new_blocks(n)
        for block in blocks:
            assert self.held(block.block_id) == 0, f"{block} handed out while in use"
            assert block.ref_cnt == 1 and block.block_hash is None
        self.refs += [b.block_id for b in blocks]

    @precondition(lambda self: self.refs)
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 3), min_size=1, max_size=2))
    def cache(self, data, tokens):
        block = self.pool.blocks[data.draw(st.sampled_from(self.refs))]
        h = hash_block_tokens(None, tokens)
        already = h in self.pool.cached
        self.pool.cache_full_block(block, h, tokens)
        if not already and block.block_hash == h:
            self.contents[h] = tuple(tokens)

    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=2))
    def lookup_and_touch(self, tokens):
        h = hash_block_tokens(None, tokens)
        block = self.pool.get_cached_block(h, tokens)
        if block is None:
            assert h not in self.pool.cached
            return
        assert block.block_hash == h and block.token_ids == tuple(tokens) == self.contents[h]
        self.pool.touch([block])
        self.refs.append(block.block_id)

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def free(self, data):
        block_id = data.draw(st.sampled_from(self.refs))
        self.refs.remove(block_id)
        self.pool.free_blocks([self.pool.blocks[block_id]])

    @rule(data=st.data())
    def double_free_is_refused(self, data):
        unheld = [b for b in self.pool.blocks if self.held(b.block_id) == 0]
        if not unheld:
            return
        block = data.draw(st.sampled_from(unheld))
        with pytest.raises(RuntimeError, match="double free"):
            self.pool.free_blocks([block])

    @rule()
    def reset_prefix_cache(self):
        self.pool.reset_prefix_cache()

    @invariant()
    def ref_counts_match_holders(self):
        for block in self.pool.blocks:
            assert block.ref_cnt == self.held(block.block_id)

    @invariant()
    def free_queue_holds_exactly_the_unreferenced(self):
        ids = free_queue_ids(self.pool)
        assert len(ids) == len(set(ids)) == self.pool.num_free_blocks
        assert set(ids) == {b.block_id for b in self.pool.blocks if b.ref_cnt == 0}

    @invariant()
    def cache_index_is_consistent(self):
        for h, block in self.pool.cached.items():
            assert block.block_hash == h and block.token_ids == self.contents[h]
        assert sum(b.block_hash is not None for b in self.pool.blocks) == len(self.pool.cached)

    def teardown(self):
        for block_id in list(self.refs):
            self.pool.free_blocks([self.pool.blocks[block_id]])
        assert all(b.ref_cnt == 0 for b in self.pool.blocks)
        assert self.pool.num_free_blocks == self.NUM_BLOCKS


TestBlockPoolMachine = BlockPoolMachine.TestCase
TestBlockPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
