"""The host KV tier: spilled prefix blocks come back token-exact, copies land in order, and the
two pools never lose or share a block (a state machine over both)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant
from test_kv_cache_manager import KVCacheManagerMachine

from splitserve.config import (
    CacheConfig,
    ConfigError,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.engine import LLMEngine
from splitserve.engine.host_tier import BlockCopy, HostKVTier
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.tiered_kv_cache import TieredKVCacheManager

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


# -- copies ----------------------------------------------------------------------


def test_copies_run_in_the_order_the_bookkeeping_made_them():
    gpu = torch.arange(4, dtype=torch.float32).repeat_interleave(3).view(4, 3)  # block i holds i, i, i
    tier = HostKVTier(1, (3,), torch.float32)
    tier.spill(2, h(1), (7,))  # block 2 -> slot 0
    tier.restore(h(1), 2)  # ... and straight back into block 2: reads what the spill wrote
    tier.spill(3, h(2), (8,))  # slot 0 reused (h(1) evicted): slot 0 now holds block 3
    tier.restore(h(2), 0)  # block 3's content into block 0
    assert tier._copies == [BlockCopy(True, 2, 0), BlockCopy(False, 2, 0), BlockCopy(True, 3, 0), BlockCopy(False, 0, 0)]
    assert tier.flush(gpu) == 4 and tier.num_pending_copies == 0
    assert gpu.tolist() == [[3.0] * 3, [1.0] * 3, [2.0] * 3, [3.0] * 3]
    assert tier.kv.tolist() == [[3.0] * 3]
    assert not tier.contains(h(1)) and tier.lookup(h(2), (8,)) is not None and tier.lookup(h(2), (9,)) is None


def test_lru_eviction_and_events():
    tier = HostKVTier(2, (1,), torch.float32)
    tier.record_kv_events = True
    tier.spill(0, h(1), (1,))
    tier.spill(1, h(2), (2,))
    tier.restore(h(1), 5)  # h(1) used: h(2) is now the least recently used
    tier.spill(2, h(3), (3,))
    assert sorted(tier.cached_hashes()) == sorted([h(1), h(3)])
    assert tier.drain_kv_events() == [("stored", h(1)), ("stored", h(2)), ("removed", h(2)), ("stored", h(3))]
    tier.spill(4, h(1), (1,))  # already here: no copy, no event
    assert tier.num_spilled_blocks == 3 and tier.drain_kv_events() == []
    assert sorted(tier.clear()) == sorted([h(1), h(3)]) and tier.num_free_slots == 2


# -- the engine ------------------------------------------------------------------------


def make(model_dir, host_bytes, num_blocks=12, async_scheduling=None):
    cache = CacheConfig(block_size=4, num_blocks=num_blocks, host_kv_cache_bytes=host_bytes)
    return LLMEngine(
        EngineConfig(
            model=ModelConfig(model_dir, dtype=torch.float32, device="cpu"),
            cache=cache,
            scheduler=SchedulerConfig(max_num_seqs=4, async_scheduling=async_scheduling),
        )
    )


def run(engine, request_id, prompt):
    engine.add_request(request_id, prompt, GREEDY)
    tokens, cached = [], 0
    while engine.has_unfinished:
        for out in engine.step().outputs:
            tokens += out.new_token_ids
            cached = out.num_cached_tokens
    return tokens, cached


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_spilled_prefix_comes_back_token_exact(llama_tiny_dir, hf_reference, async_scheduling):
    engine = make(llama_tiny_dir, host_bytes=1 << 30, async_scheduling=async_scheduling)
    tier = engine.host_tier
    prefix = [3, 141, 59, 265, 358, 979, 323, 846, 264, 338, 327, 950, 288, 419, 11, 12]  # 4 blocks
    first, cached = run(engine, "a", prefix + [5])
    assert cached == 0 and first == hf_reference.tokens(llama_tiny_dir, prefix + [5], 6)
    # Other prompts take every GPU block: the prefix's blocks are evicted to the host.
    for i in range(3):
        run(engine, f"x{i}", [(17 * i + j) % 500 + 1 for j in range(33)])
    assert tier.num_spilled_blocks >= 4 and tier.num_restored_blocks == 0
    gpu_hashes = set(engine.block_pool.cached)
    host_only = [hb for hb in tier.cached_hashes() if hb not in gpu_hashes]
    assert host_only, "nothing was evicted to the host"

    again = prefix + [7, 8]
    tokens, cached = run(engine, "b", again)
    assert cached == 16 and tier.num_restored_blocks >= 1
    assert tokens == hf_reference.tokens(llama_tiny_dir, again, 6)
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks


def test_without_the_tier_the_same_workload_recomputes(llama_tiny_dir):
    engine = make(llama_tiny_dir, host_bytes=None)
    prefix = [3, 141, 59, 265, 358, 979, 323, 846, 264, 338, 327, 950, 288, 419, 11, 12]
    run(engine, "a", prefix + [5])
    for i in range(3):
        run(engine, f"x{i}", [(17 * i + j) % 500 + 1 for j in range(33)])
    assert run(engine, "b", prefix + [7, 8])[1] < 16


def test_host_tier_settings_are_checked(llama_tiny_dir):
    with pytest.raises(ConfigError, match="host_kv_cache_bytes"):
        CacheConfig(host_kv_cache_bytes=0)
    with pytest.raises(ConfigError, match="holds no KV block"):
        make(llama_tiny_dir, host_bytes=1)


# -- both pools under random operations ------------------------------------------------------


class RecordingHostTier(HostKVTier):
    """Applies each copy to the machine's shadows as it is recorded: nothing is computed between
    the bookkeeping and ``flush``, so the model may take copies as done at once."""

    def __init__(self, machine, num_blocks: int) -> None:
        super().__init__(num_blocks, (1,), torch.float32)
        self.machine = machine

    def _record(self, copy: BlockCopy) -> None:
        super()._record(copy)
        m = self.machine
        if copy.to_host:
            m.host_shadow[copy.slot_id] = dict(m.shadow.get(copy.gpu_block_id, {}))
        else:
            m.shadow[copy.gpu_block_id] = dict(m.host_shadow[copy.slot_id])


class TieredKVCacheManagerMachine(KVCacheManagerMachine):
    """The KV cache manager's machine (every rule, every invariant) over a pool with a host tier
    under it; the shadows follow each spill and restore, and the host tier is checked too."""

    @initialize(num_blocks=st.integers(3, 12), block_size=st.sampled_from([1, 2, 4]), num_host_blocks=st.integers(1, 8))
    def setup(self, num_blocks, block_size, num_host_blocks):
        self.host_shadow: dict[int, dict[int, int]] = {}
        self.tier = RecordingHostTier(self, num_host_blocks)
        self.kv = TieredKVCacheManager(BlockPool(num_blocks), block_size, self.tier)
        self.pool = self.kv.block_pool
        self.block_size = block_size

    @invariant()
    def host_blocks_hold_their_tokens_and_no_slot_is_lost(self):
        if not hasattr(self, "tier"):
            return
        slots = [self.tier._slots[hb].slot_id for hb in self.tier.cached_hashes()]
        free = self.tier._free_slots
        assert len(set(slots)) == len(slots) and not set(slots) & set(free), "a host slot is held twice"
        assert sorted(slots + free) == list(range(self.tier.num_blocks)), "a host slot leaked"
        for block_hash in self.tier.cached_hashes():
            slot = self.tier._slots[block_hash]
            assert tuple(self.host_shadow[slot.slot_id].get(j) for j in range(self.block_size)) == slot.token_ids

    @invariant()
    def every_gpu_block_is_free_or_held(self):
        if not hasattr(self, "tier"):
            return
        # Spills and restores take no reference: a block is either with a request (or quarantined) or free.
        assert self.pool.num_free_blocks + sum(b.ref_cnt > 0 for b in self.pool.blocks) == self.pool.num_blocks
        self.tier.flush(torch.zeros(self.pool.num_blocks, 1))
        assert self.tier.num_pending_copies == 0


TestTieredKVCacheManager = TieredKVCacheManagerMachine.TestCase
TestTieredKVCacheManager.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_a_tensor_parallel_worker_is_refused_a_host_tier(llama_tiny_dir):
    from splitserve.engine.host_tier import make_host_tier

    engine = make(llama_tiny_dir, host_bytes=None)
    with pytest.raises(ConfigError, match="tensor parallel size of 1"):
        make_host_tier(CacheConfig(host_kv_cache_bytes=1 << 20), engine.runner, tp_size=2)
