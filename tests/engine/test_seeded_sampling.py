"""Same seed, same tokens: whether the first token came from another worker, or the request was preempted."""
from __future__ import annotations

from splitserve.engine.request import TokenLogprob
from splitserve.engine.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
PROMPT = [3 + (7 * i) % 500 for i in range(23)]


def _run(engine, request_id, prompt, params, **kwargs) -> list[int]:
    engine.add_request(request_id, prompt, params, **kwargs)
    tokens = []
    while engine.has_unfinished:
        for out in engine.step().outputs:
            if out.request_id == request_id:
                tokens += out.new_token_ids
    return tokens


def test_first_token_sampled_elsewhere_continues_the_same_seeded_stream(make_engine, llama_tiny_dir):
    whole = _run(make_engine(llama_tiny_dir), "whole", PROMPT, PARAMS)
    assert len(set(whole)) > 3  # really sampled, not a constant
    # A decode worker that got the first token from a prefill worker (and recomputed the prompt).
    rest = _run(make_engine(llama_tiny_dir), "rest", PROMPT, PARAMS, first_token=TokenLogprob(whole[0], 0.0))
    assert [whole[0], *rest] == whole


def test_preemption_does_not_change_seeded_output(make_engine, llama_tiny_dir):
    alone = _run(make_engine(llama_tiny_dir), "a", PROMPT, PARAMS)
    engine = make_engine(llama_tiny_dir, num_blocks=14)  # too few blocks for both: one is preempted
    engine.add_request("other", PROMPT[::-1], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    squeezed = _run(engine, "a", PROMPT, PARAMS)
    assert engine.scheduler.num_preemptions > 0
    assert squeezed == alone


def test_different_seeds_differ(make_engine, llama_tiny_dir):
    a = _run(make_engine(llama_tiny_dir), "a", PROMPT, PARAMS)
    b = _run(make_engine(llama_tiny_dir), "b", PROMPT, SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=99, ignore_eos=True))
    assert a != b
