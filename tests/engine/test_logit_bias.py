"""logit_bias: added to a request's logits before it samples, on either scheduling path; the
logprobs reported stay the model's own; bad values are refused by name."""
from __future__ import annotations

import pytest
import torch

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.sampler import apply_logit_bias
from splitserve.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_bias_steers_greedy_decoding_and_leaves_others_alone(make_engine, run_engine, llama_tiny_dir, async_scheduling):
    engine = make_engine(llama_tiny_dir, async_scheduling=async_scheduling)
    prompt = [5, 17, 99, 230, 41]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine.add_request("plain", prompt, greedy)
    engine.add_request("forced", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logit_bias={300: 100.0}))
    first = run_engine(engine)
    assert first["forced"] == [300] * 6
    banned = first["plain"][0]
    engine.add_request("plain-again", prompt, greedy)  # batched with a biased request: unchanged
    engine.add_request("banned", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logit_bias={banned: -100.0}))
    second = run_engine(engine)
    assert second["plain-again"] == first["plain"]
    assert second["banned"][0] != banned


def test_logprobs_are_the_models_own_and_rows_are_separate():
    logits = torch.zeros(2, 8)

    class R:  # the sampler reads only sampling_params
        def __init__(self, params):
            self.sampling_params = params

    biased = apply_logit_bias(logits, [R(SamplingParams(logit_bias={3: 5.0, 7: -2.0})), R(SamplingParams())])
    assert biased[0, 3] == 5.0 and biased[0, 7] == -2.0 and biased[1].abs().sum() == 0
    assert logits.abs().sum() == 0  # a copy: the model's logits (and their logprobs) are untouched


def test_bad_bias_is_refused_by_name(make_engine, llama_tiny_dir):
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        SamplingParams(logit_bias={1: 100.5})
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        SamplingParams(logit_bias={1: float("nan")})
    with pytest.raises(InvalidRequestError, match="logit_bias.*301"):
        SamplingParams(logit_bias={i: 1.0 for i in range(301)})
    engine = make_engine(llama_tiny_dir)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request("r", [1, 2, 3], SamplingParams(logit_bias={10**6: 1.0}))
