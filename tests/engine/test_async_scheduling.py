"""Async scheduling (step N+1 scheduled while step N computes) against the synchronous engine.

Both engines run the same tiny fp32 model on the CPU, where nothing is asynchronous but the
bookkeeping is the same as on a GPU: each step returns the tokens of the step before, a
request's newest token is a placeholder the next step computes from the device copy, and
rows of requests that stopped meanwhile are discarded. Every test compares tokens, finish
reasons and prefix hits with the synchronous engine and checks that no block is left. (A
tensor-parallel runner refuses async scheduling: tests/parallel/test_tp_equivalence.py.)
"""
from __future__ import annotations

import pytest
import torch

from splitserve.engine.request import PLACEHOLDER, FinishReason
from splitserve.engine.sampling_params import SamplingParams

PROMPTS = {
    "a": [3, 141, 59, 265, 358, 979, 323, 846, 264, 338, 327, 950, 288, 419],
    "b": [3, 141, 59, 265, 358, 979, 323, 846, 11, 12],  # shares two blocks with a
    "c": [500, 17, 33],
    "d": list(range(40, 71)),
    "e": [9],
}


def run(engine, requests, abort_at=None):
    """Adds ``requests`` ({id: (prompt, params)}) one per step, aborts ``abort_at`` ({step: id}),
    steps to the end; returns {id: (tokens, finish_reason, num_cached_tokens)}."""
    pending = list(requests.items())
    results: dict[str, tuple[list[int], FinishReason | None, int]] = {}
    for step in range(10_000):
        if pending:
            request_id, (prompt, params) = pending.pop(0)
            engine.add_request(request_id, prompt, params)
        if abort_at and step in abort_at:
            request = engine.scheduler.requests[abort_at[step]]
            engine.aborted_with_token_in_flight = getattr(engine, "aborted_with_token_in_flight", 0) + request.num_pending_tokens
            assert engine.abort(request.request_id)
        if not engine.has_unfinished and not pending:
            break
        for out in engine.step().outputs:
            assert PLACEHOLDER not in out.new_token_ids
            tokens, _, _ = results.get(out.request_id, ([], None, 0))
            results[out.request_id] = (tokens + out.new_token_ids, out.finish_reason, out.num_cached_tokens)
    assert engine.kv_cache_manager.num_requests == 0
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks
    return results


def both(make_engine, model_dir, requests, abort_at=None, **engine_options):
    sync = make_engine(model_dir, async_scheduling=False, **engine_options)
    overlapped = make_engine(model_dir, async_scheduling=True, **engine_options)
    assert overlapped.async_scheduling and not sync.async_scheduling
    expected = run(sync, requests, abort_at)
    got = run(overlapped, requests, abort_at)
    return expected, got, sync, overlapped


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


ON_GPU = pytest.param(
    "cuda", 16, 5, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
)


@pytest.mark.parametrize(("device", "block_size", "num_blocks"), [("cpu", 4, 16), ON_GPU])
def test_exact_with_stops_chunking_and_preemption(device, block_size, num_blocks, llama_tiny_dir, make_engine, run_engine):
    # Stop tokens taken from a first run, so requests stop mid-sequence with a row in flight. On
    # the GPU, decode steps replay CUDA graphs whose input tokens are taken from the device.
    probe = make_engine(llama_tiny_dir)
    for request_id, prompt in PROMPTS.items():
        probe.add_request(request_id, prompt, greedy(12, ignore_eos=True))
    seen = run_engine(probe)
    requests = {
        request_id: (prompt, greedy(4 + 2 * i, stop_token_ids=(seen[request_id][2],), ignore_eos=True))
        for i, (request_id, prompt) in enumerate(PROMPTS.items())
    }
    requests["long1"] = (PROMPTS["d"][:20][::-1], greedy(36, ignore_eos=True))
    requests["long2"] = (PROMPTS["d"][5:25], greedy(36, ignore_eos=True))
    # Too few blocks for all at once (two 56-token requests alone need 28 of 4 tokens): the scheduler preempts.
    expected, got, sync, overlapped = both(
        make_engine, llama_tiny_dir, requests, num_blocks=num_blocks, block_size=block_size, max_num_batched_tokens=8, device=device
    )
    assert got == expected
    assert sum(reason == FinishReason.STOP for _, reason, _ in got.values()) >= 3
    assert overlapped.scheduler.num_preemptions > 0
    assert overlapped.num_discarded_rows > 0  # stops were found with the next row queued
    if device == "cuda":
        assert overlapped.runner.graphs.num_replays > 10


def test_prefix_hits_hash_real_tokens(llama_tiny_dir, make_engine):
    # b's prompt is a's prompt and output: its hits cover blocks whose last token was once a placeholder.
    first = {"a": (PROMPTS["a"], greedy(10, ignore_eos=True))}
    sync = make_engine(llama_tiny_dir, async_scheduling=False)
    overlapped = make_engine(llama_tiny_dir, async_scheduling=True)
    a_tokens = run(sync, first)["a"][0]
    assert run(overlapped, first)["a"][0] == a_tokens
    second = {"b": (PROMPTS["a"] + a_tokens + [7], greedy(3, ignore_eos=True))}
    expected, got = run(sync, second), run(overlapped, second)
    assert got == expected
    # Every full block a computed was a hit (its last token was sampled, never computed).
    assert got["b"][2] == (len(PROMPTS["a"]) + len(a_tokens) - 1) // 4 * 4


def test_length_limits_are_not_overrun(llama_tiny_dir, make_engine):
    # The placeholder of a request's last token is never scheduled: no position at or past max_model_len.
    requests = {"a": (PROMPTS["a"], greedy(100, ignore_eos=True)), "c": (PROMPTS["c"], greedy(1, ignore_eos=True))}
    expected, got, _, overlapped = both(make_engine, llama_tiny_dir, requests, max_model_len=24)
    assert got == expected
    assert len(got["a"][0]) == 24 - len(PROMPTS["a"]) and got["a"][1] == FinishReason.LENGTH
    assert overlapped.num_discarded_rows == 0  # lengths are known ahead: nothing computed for nothing


def test_abort_with_a_token_in_flight(llama_tiny_dir, make_engine):
    requests = {request_id: (prompt, greedy(8, ignore_eos=True)) for request_id, prompt in PROMPTS.items()}
    expected, got, _, overlapped = both(make_engine, llama_tiny_dir, requests, abort_at={4: "a", 7: "c"})
    assert overlapped.aborted_with_token_in_flight == 2
    assert {k: v for k, v in got.items() if k not in "ac"} == {k: v for k, v in expected.items() if k not in "ac"}
    for request_id in "ac":  # an aborted request ends without an output; what it got is a prefix of the full output
        full = run(make_engine(llama_tiny_dir), {request_id: requests[request_id]})[request_id][0]
        assert got[request_id][1] is None and 0 < len(got[request_id][0]) < len(full)
        assert got[request_id][0] == full[: len(got[request_id][0])]


def test_host_sampled_requests_in_the_same_batch(llama_tiny_dir, make_engine):
    # Seeded sampling, penalties and logprobs need the host: such steps run synchronously.
    requests = {
        "a": (PROMPTS["a"], greedy(6, ignore_eos=True)),
        "b": (PROMPTS["b"], SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)),
        "c": (PROMPTS["c"], greedy(6, ignore_eos=True, repetition_penalty=1.3)),
        "d": (PROMPTS["d"], greedy(9, ignore_eos=True)),
        "e": (PROMPTS["e"], greedy(5, ignore_eos=True, logprobs=True)),
    }
    expected, got, _, overlapped = both(make_engine, llama_tiny_dir, requests)
    assert got == expected
    assert overlapped.num_host_sampled_steps > 0


def test_held_kv_for_a_prefill_worker(llama_tiny_dir, make_engine):
    engine = make_engine(llama_tiny_dir, async_scheduling=True)
    engine.add_request("p", PROMPTS["a"], greedy(1, ignore_eos=True), hold_kv=True)
    outputs = []
    while engine.has_unfinished:
        outputs += engine.step().outputs
    assert len(outputs) == 1 and outputs[0].finished
    assert len(engine.get_block_ids("p")) == 4  # held: 14 tokens in blocks of 4
    engine.release("p")
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks



def test_unseeded_sampling_stays_on_the_device_and_matches(llama_tiny_dir, make_engine):
    # Unseeded sampling is batched on the device (no synchronous step); with lengths known ahead the
    # two engines run the same batches, so the same generator gives the same tokens.
    requests = {
        "a": (PROMPTS["a"], SamplingParams(max_tokens=7, temperature=0.9, top_p=0.8, ignore_eos=True)),
        "b": (PROMPTS["b"], SamplingParams(max_tokens=9, temperature=1.3, top_k=5, ignore_eos=True)),
        "c": (PROMPTS["c"], greedy(6, ignore_eos=True)),
        "d": (PROMPTS["d"], SamplingParams(max_tokens=5, temperature=0.7, min_p=0.1, ignore_eos=True)),
    }
    expected, got, _, overlapped = both(make_engine, llama_tiny_dir, requests)
    assert got == expected
    assert overlapped.num_host_sampled_steps == 0
