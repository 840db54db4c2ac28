"""Rejected proposals are rolled back without leaking or double-freeing a block (hypothesis).

A state machine drives the real scheduler, KV cache manager and block pool (no model: a
step's outcome is drawn) through requests arriving, proposals of any length, any number of
them accepted, stops inside an accepted run, preemption in a small pool, prefix sharing
and aborts. After every step each block's reference count equals the number of requests
holding it, a freed block is in the free queue exactly once, a request holds no block past
its new length, and a cached block holds the request's own verified tokens.
"""
from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from splitserve.config import SchedulerConfig
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.request import Request, RequestStatus
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.speculative.decoder import commit

BLOCK_SIZE = 4
NUM_BLOCKS = 24
K = 4
STOP = 0  # a stop token, drawn now and then inside an accepted run


class RollbackMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS, enable_caching=True)
        self.kv = KVCacheManager(self.pool, BLOCK_SIZE)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=20), self.kv, max_model_len=64)
        self.num_ids = 0

    @rule(prompt=st.lists(st.integers(1, 3), min_size=1, max_size=20), max_tokens=st.integers(1, 24))
    def add(self, prompt, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=(STOP,))
        self.scheduler.add_request(Request(f"r{self.num_ids}", prompt, params))
        self.num_ids += 1

    @precondition(lambda self: self.scheduler.num_unfinished)
    @rule(data=st.data())
    def step(self, data):
        for request in self.scheduler.running:
            request.spec_token_ids = data.draw(st.lists(st.integers(1, 3), max_size=K))
            if request.spec_token_ids and data.draw(st.booleans()):  # a draft model takes its slots before the step
                self.kv.allocate_slots(request, 1 + len(request.spec_token_ids))
        out = self.scheduler.schedule()
        new = []
        for s in out.scheduled:
            if not s.sample:
                continue
            proposed = s.token_ids[len(s.token_ids) - s.num_spec :] if s.num_spec else []
            accepted = data.draw(st.integers(0, len(proposed)))
            last = data.draw(st.sampled_from([STOP, 1, 2, 3]))
            new.append((self.scheduler.requests[s.request_id], [*proposed[:accepted], last], []))
        for request, _, _ in commit(self.scheduler, self.kv, out, new):
            if not request.is_finished:
                num_blocks = len(self.kv.get_block_ids(request.request_id))
                assert self.kv.num_blocks_for(request.num_computed_tokens) <= num_blocks <= self.kv.num_blocks_for(request.num_tokens)
                assert request.num_computed_tokens == request.num_tokens - 1

    @precondition(lambda self: self.scheduler.requests)
    @rule(data=st.data())
    def abort(self, data):
        request_id = data.draw(st.sampled_from(sorted(self.scheduler.requests)))
        self.scheduler.finish_request(request_id)

    @invariant()
    def every_reference_is_a_holder(self):
        holders: dict[int, int] = {}
        for blocks in self.kv.req_to_blocks.values():
            for block in blocks:
                holders[block.block_id] = holders.get(block.block_id, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_cnt == holders.get(block.block_id, 0), block
        free = []
        node = self.pool.free_queue._head.next_free
        while node is not self.pool.free_queue._tail:
            free.append(node.block_id)
            node = node.next_free
        assert len(free) == len(set(free)) == self.pool.num_free_blocks
        assert set(free) == {b.block_id for b in self.pool.blocks if b.ref_cnt == 0}

    @invariant()
    def no_block_past_the_tokens_and_cached_blocks_are_verified(self):
        for request_id, blocks in self.kv.req_to_blocks.items():
            request = self.scheduler.requests[request_id]
            assert len(blocks) <= self.kv.num_blocks_for(request.num_tokens + K)
            if request.status == RequestStatus.FINISHED:
                continue
            for i, block in enumerate(blocks):
                if block.block_hash is not None:
                    assert (i + 1) * BLOCK_SIZE <= request.num_computed_tokens
                    assert block.token_ids == tuple(request.all_token_ids[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])

    def teardown(self):
        for request_id in list(self.scheduler.requests):
            self.scheduler.finish_request(request_id)
        assert self.pool.num_free_blocks == NUM_BLOCKS
        assert all(b.ref_cnt == 0 for b in self.pool.blocks)


RollbackMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestRollback = RollbackMachine.TestCase
