"""Bad input gets an InvalidRequestError naming the field, and the engine keeps serving everyone else exactly."""
from __future__ import annotations

import pytest

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.sampling_params import SamplingParams

MAX_MODEL_LEN = 32
MAX_NEW = 6
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
BEFORE = [5, 600, 7, 81, 9, 10, 311]  # in flight when the bad request arrives
AFTER = [44, 45, 46, 900, 12]  # submitted after it


@pytest.fixture
def engine(llama_tiny_dir, make_engine):
    return make_engine(llama_tiny_dir, max_model_len=MAX_MODEL_LEN, num_blocks=16, max_num_batched_tokens=4)


def bad_prompt(case: str, vocab_size: int) -> list[int]:
    return {
        "empty": [],
        "as-long-as-the-context": [7] * MAX_MODEL_LEN,
        "longer-than-the-context": [7] * (MAX_MODEL_LEN + 9),
        "token-id-past-the-vocabulary": [5, 6, vocab_size],
        "negative-token-id": [5, -1, 6],
    }[case]


def assert_still_serving(engine, hf_reference, model_dir):
    engine.add_request("after", AFTER, GREEDY)
    tokens = {}
    while engine.has_unfinished:
        for out in engine.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert tokens["before"] == hf_reference.tokens(model_dir, BEFORE, MAX_NEW)
    assert tokens["after"] == hf_reference.tokens(model_dir, AFTER, MAX_NEW)
    assert "bad" not in tokens and "bad" not in engine.scheduler.requests
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks


def start_one(engine):
    engine.add_request("before", BEFORE, GREEDY)
    engine.step()  # mid-prefill: 4 of its 7 tokens computed
    assert engine.scheduler.requests["before"].num_computed_tokens == 4


@pytest.mark.parametrize(
    "case, field",
    [
        ("empty", "prompt"),
        ("as-long-as-the-context", "prompt"),
        ("longer-than-the-context", "prompt"),
        ("token-id-past-the-vocabulary", "prompt_token_ids"),
        ("negative-token-id", "prompt_token_ids"),
    ],
)
def test_bad_prompt(engine, llama_tiny_dir, hf_reference, case, field):
    start_one(engine)
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("bad", bad_prompt(case, engine.vocab_size), GREEDY)
    assert err.value.field == field
    assert_still_serving(engine, hf_reference, llama_tiny_dir)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.2), "top_p"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(top_logprobs=21), "top_logprobs"),
    ],
    ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else v,
)
def test_bad_sampling_params(engine, llama_tiny_dir, hf_reference, kwargs, field):
    start_one(engine)
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("bad", AFTER, SamplingParams(**kwargs))
    assert err.value.field == field and field in str(err.value)
    assert_still_serving(engine, hf_reference, llama_tiny_dir)


@pytest.mark.parametrize(
    "case, field",
    [
        ("max-tokens-over-the-limit", "max_tokens"),
        ("stop-token-past-the-vocabulary", "stop_token_ids"),
        ("prompt-larger-than-the-kv-pool", "prompt"),
        ("prompt-and-max-tokens-larger-than-the-kv-pool", "max_tokens"),
        ("request-id-in-flight", "request_id"),
    ],
)
def test_bad_request_for_this_engine(engine, llama_tiny_dir, hf_reference, case, field):
    start_one(engine)
    prompt, params, request_id = AFTER, GREEDY, "bad"
    if case == "max-tokens-over-the-limit":
        params = SamplingParams(max_tokens=engine.config.scheduler.max_tokens_limit + 1)
    elif case == "stop-token-past-the-vocabulary":
        params = SamplingParams(stop_token_ids=[engine.vocab_size + 5])
    elif case == "prompt-larger-than-the-kv-pool":
        prompt = [7] * (engine.block_pool.num_blocks * engine.block_size)  # fits the context, not the pool
        engine.max_model_len = 1000  # so that only the pool is too small
    elif case == "prompt-and-max-tokens-larger-than-the-kv-pool":
        # Admitted, it could never finish: preempting it to make room would recompute it forever.
        engine.max_model_len = 1000
        params = SamplingParams(max_tokens=engine.block_pool.num_blocks * engine.block_size)
    else:
        request_id = "before"
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request(request_id, prompt, params)
    assert err.value.field == field
    if case == "prompt-larger-than-the-kv-pool":
        assert "KV blocks" in str(err.value)
    assert_still_serving(engine, hf_reference, llama_tiny_dir)


def test_validate_checks_without_queueing(engine):
    engine.validate(AFTER, GREEDY)
    with pytest.raises(InvalidRequestError):
        engine.validate([], GREEDY)
    assert not engine.has_unfinished
