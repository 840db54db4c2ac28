"""What the engine reports through its public stats surface (LLMEngine.stats and
drain_request_times): counters that match what it produced, intervals that add up, and no
record left behind by an aborted request."""
from __future__ import annotations

import pytest

from splitserve.engine.sampling_params import SamplingParams

PROMPT = [3, 141, 59, 265, 358, 979, 323, 846, 264, 338, 327, 950, 288, 419]  # 14 tokens, block size 4: 3 full blocks
GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_counters_and_request_times(llama_tiny_dir, make_engine, run_engine, async_scheduling):
    engine = make_engine(llama_tiny_dir, async_scheduling=async_scheduling)
    engine.add_request("a", PROMPT, GREEDY)
    run_engine(engine)
    engine.add_request("b", PROMPT, GREEDY)  # its 3 full blocks are in the prefix cache now
    engine.add_request("c", [7, 8, 9], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    tokens = run_engine(engine)

    s = engine.stats()
    assert s.num_generation_tokens == 5 + len(tokens["b"]) + len(tokens["c"]) == 13
    assert s.num_prefix_queried_tokens == 2 * len(PROMPT) + 3
    assert s.num_prefix_hit_tokens == 12
    assert s.num_running == s.num_waiting == 0 and s.kv_cache_usage == 0.0

    times = engine.drain_request_times()
    assert len(times) == 3 and engine.drain_request_times() == []
    for t in times:
        assert t.finish_reason == "length"
        assert min(t.queue_seconds, t.prefill_seconds, t.decode_seconds) >= 0
        assert t.inference_seconds == pytest.approx(t.prefill_seconds + t.decode_seconds)
        assert t.e2e_seconds == pytest.approx(t.queue_seconds + t.inference_seconds)
        assert t.decode_seconds > 0  # several tokens, several steps


def test_kv_cache_usage_while_running(llama_tiny_dir, make_engine):
    engine = make_engine(llama_tiny_dir, num_blocks=64)
    engine.add_request("a", PROMPT, GREEDY)
    engine.step()
    s = engine.stats()
    assert s.num_running == 1
    assert s.kv_cache_usage == pytest.approx((64 - s.num_free_blocks) / 64) and s.kv_cache_usage >= 4 / 64


def test_aborted_requests_leave_no_record(llama_tiny_dir, make_engine, run_engine):
    engine = make_engine(llama_tiny_dir)
    engine.add_request("waiting", PROMPT, GREEDY)
    engine.add_request("running", PROMPT[:5], GREEDY)
    engine.step()
    engine.abort("waiting")
    engine.abort("running")
    run_engine(engine)
    assert engine.drain_request_times() == []
    assert len(engine._clock) == 0  # nothing kept for requests that are gone


def test_queue_time_is_the_wait_for_a_slot(llama_tiny_dir, make_engine, run_engine):
    """One running slot: the second request waits out the first, and its queue time says so."""
    engine = make_engine(llama_tiny_dir, max_num_seqs=1)
    engine.add_request("first", PROMPT, GREEDY)
    engine.add_request("second", PROMPT[:6], GREEDY)
    run_engine(engine)
    first, second = engine.drain_request_times()  # in the order they finished
    assert second.queue_seconds > first.inference_seconds > 0
    assert first.queue_seconds < second.queue_seconds
