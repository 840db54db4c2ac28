"""The scheduler on its own: token budget, chunking, continuous batching, sequence limit, preemption.

No model runs here: a step "computes" whatever was scheduled and samples a fixed token,
which is all the scheduler can see of a model anyway. The engine-level tests with a
real model (remote KV, held KV, exact outputs) are in test_engine.py.
"""
from __future__ import annotations

import pytest

from splitserve.config import SchedulerConfig
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.request import FinishReason, Request, RequestStatus
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler, SchedulerOutput

SAMPLED_TOKEN = 7


def make_scheduler(
    num_blocks=64, block_size=4, max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=1000, enable_caching=True
) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks, enable_caching), block_size)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    return Scheduler(config, kv, max_model_len)


def add(scheduler: Scheduler, request_id: str, num_prompt_tokens: int, max_tokens: int = 4, first: int = 100) -> Request:
    request = Request(request_id, list(range(first, first + num_prompt_tokens)), SamplingParams(max_tokens=max_tokens))
    scheduler.add_request(request)
    return request


def step(scheduler: Scheduler) -> SchedulerOutput:
    out = scheduler.schedule()
    for s in out.scheduled:  # the block table covers every token computed this step
        assert len(s.block_ids) * scheduler.kv.block_size >= s.start_pos + len(s.token_ids)
    sampled = {s.request_id: (SAMPLED_TOKEN, None) for s in out.scheduled if s.sample}
    scheduler.update_from_output(out, sampled)
    return out


def run(scheduler: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    outs = []
    while scheduler.num_unfinished:
        outs.append(step(scheduler))
        assert len(outs) < max_steps, "no progress"
    return outs


def assert_pool_empty(scheduler: Scheduler) -> None:
    assert scheduler.kv.num_requests == 0
    assert scheduler.kv.num_free_blocks == scheduler.kv.block_pool.num_blocks


def test_prefill_is_chunked_under_the_token_budget():
    scheduler = make_scheduler(max_num_batched_tokens=4)
    requests = [add(scheduler, "a", 10, first=100), add(scheduler, "b", 7, first=200), add(scheduler, "c", 3, first=300)]
    outs = run(scheduler)

    assert all(0 < out.num_batched_tokens <= 4 for out in outs)
    for request in requests:
        chunks = [s for out in outs for s in out.scheduled if s.request_id == request.request_id]
        computed = [t for s in chunks for t in s.token_ids]
        assert computed == request.prompt_token_ids + [SAMPLED_TOKEN] * (request.sampling_params.max_tokens - 1)
        positions = [s.start_pos for s in chunks]
        assert positions == sorted(positions) and positions[0] == 0
        assert request.finish_reason == FinishReason.LENGTH
    assert scheduler.num_prompt_tokens_computed == 20
    assert_pool_empty(scheduler)


def test_sample_only_when_a_chunk_reaches_the_last_token():
    scheduler = make_scheduler(max_num_batched_tokens=4)
    add(scheduler, "a", 10, max_tokens=2)
    outs = run(scheduler)
    assert [(s.start_pos, len(s.token_ids), s.sample) for out in outs for s in out.scheduled] == [
        (0, 4, False),
        (4, 4, False),
        (8, 2, True),  # first token sampled
        (10, 1, True),  # decode
    ]


def test_budget_goes_to_running_requests_first():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    add(scheduler, "a", 5, max_tokens=10)
    step(scheduler)  # a prefilled, decoding from now on
    add(scheduler, "b", 30)
    out = step(scheduler)
    assert [(s.request_id, len(s.token_ids)) for s in out.scheduled] == [("a", 1), ("b", 7)]


def test_new_requests_join_the_running_batch():
    scheduler = make_scheduler()
    a = add(scheduler, "a", 6, max_tokens=8)
    for _ in range(3):
        step(scheduler)
    assert a.num_output_tokens == 3
    add(scheduler, "b", 5, max_tokens=2)
    out = step(scheduler)
    assert {s.request_id for s in out.scheduled} == {"a", "b"}  # a keeps decoding while b prefills
    assert a.num_output_tokens == 4
    run(scheduler)
    assert a.num_output_tokens == 8
    assert_pool_empty(scheduler)


def test_max_num_seqs_bounds_the_running_batch():
    scheduler = make_scheduler(max_num_seqs=2)
    requests = [add(scheduler, f"r{i}", 5, max_tokens=3, first=10 * i) for i in range(5)]
    first_scheduled = []
    while scheduler.num_unfinished:
        out = step(scheduler)
        assert len(out.scheduled) <= 2 and len(scheduler.running) <= 2
        first_scheduled += [s.request_id for s in out.scheduled if s.start_pos == 0]
    assert first_scheduled == [f"r{i}" for i in range(5)]  # first come, first served
    assert all(r.finish_reason == FinishReason.LENGTH for r in requests)
    assert_pool_empty(scheduler)


@pytest.mark.parametrize("enable_caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_preemption_frees_the_newest_and_recomputes_it_later(enable_caching):
    # Two requests of 7 prompt + up to 8 outputs need 4 blocks each at the end; only 6 exist.
    scheduler = make_scheduler(num_blocks=6, block_size=4, enable_caching=enable_caching)
    a = add(scheduler, "a", 7, max_tokens=8, first=100)
    b = add(scheduler, "b", 7, max_tokens=8, first=200)
    outs = run(scheduler)

    assert scheduler.num_preemptions > 0
    preempted = {rid for out in outs for rid in out.preempted_ids}
    assert preempted == {"b"}  # the newest goes first
    # b is recomputed over its prompt and the outputs it already had, from position 0, or
    # from the end of its own blocks that the prefix cache still holds.
    restart = next(i for i, out in enumerate(outs) if "b" in out.preempted_ids)
    num_tokens_then = 7 + sum(s.sample for out in outs[: restart + 1] for s in out.scheduled if s.request_id == "b")
    resumed = next(s for out in outs[restart + 1 :] for s in out.scheduled if s.request_id == "b")
    assert resumed.start_pos + len(resumed.token_ids) == num_tokens_then > 8
    assert resumed.token_ids == b.all_token_ids[resumed.start_pos : num_tokens_then]
    if enable_caching:
        assert resumed.start_pos > 0 and resumed.start_pos % 4 == 0
    else:
        assert resumed.start_pos == 0
    assert a.num_output_tokens == b.num_output_tokens == 8
    assert_pool_empty(scheduler)


def test_prefix_hits_advance_the_computed_tokens():
    scheduler = make_scheduler(block_size=4)
    add(scheduler, "a", 10, max_tokens=1, first=100)
    run(scheduler)
    b = add(scheduler, "b", 12, max_tokens=1, first=100)  # shares the 8 tokens of a's two full blocks
    out = step(scheduler)
    assert b.num_cached_tokens == 8 and scheduler.num_prefix_hit_tokens == 8
    assert [(s.start_pos, len(s.token_ids)) for s in out.scheduled] == [(8, 4)]


def test_finish_request_from_anywhere_frees_everything():
    scheduler = make_scheduler(max_num_batched_tokens=4, max_num_seqs=1)
    add(scheduler, "running", 10)
    add(scheduler, "waiting", 3)
    step(scheduler)
    assert scheduler.finish_request("waiting").status == RequestStatus.FINISHED
    aborted = scheduler.finish_request("running")
    assert aborted.finish_reason == FinishReason.ABORT
    assert scheduler.finish_request("unknown") is None
    assert scheduler.num_unfinished == 0 and not scheduler.schedule().scheduled
    assert_pool_empty(scheduler)


@pytest.mark.parametrize("budget", [1, 3, 16])
def test_every_token_is_computed_once_whatever_the_budget(budget):
    scheduler = make_scheduler(max_num_batched_tokens=budget, num_blocks=32)
    requests = [add(scheduler, f"r{i}", n, max_tokens=3, first=50 * i) for i, n in enumerate((1, 4, 9, 13))]
    outs = run(scheduler)
    for request in requests:
        tokens = [t for out in outs for s in out.scheduled if s.request_id == request.request_id for t in s.token_ids]
        assert tokens == request.all_token_ids[:-1]  # all but the last sampled token, which nobody computes
    assert_pool_empty(scheduler)
