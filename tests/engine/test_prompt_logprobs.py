"""Prompt logprobs: each prompt token's logprob given the ones before it, as transformers computes
them over the whole prompt, whether the prompt is prefilled in one step or in chunks, with the
prefix cache holding it already, or batched with requests that do not ask."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def reference(llama_tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_tiny_dir, dtype=torch.float32).eval()

    def logprobs(prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)  # [len, vocab]: row i predicts token i + 1

    return logprobs


@pytest.mark.parametrize("max_num_batched_tokens, async_scheduling", [(2048, False), (8, False), (8, True)])
def test_prompt_logprobs_match_transformers(make_engine, llama_tiny_dir, reference, max_num_batched_tokens, async_scheduling):
    engine = make_engine(llama_tiny_dir, max_num_batched_tokens=max_num_batched_tokens, async_scheduling=async_scheduling)
    prompt = [1, 57, 300, 12, 911, 45, 45, 2, 600, 77, 301, 18, 5, 999, 64, 3, 250, 41, 7]
    params = SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2)
    engine.add_request("cached", prompt, SamplingParams(max_tokens=1, temperature=0.0))  # puts the prompt in the prefix cache
    outputs = {}
    while engine.has_unfinished:
        engine.step()
    engine.add_request("asks", prompt, params)
    engine.add_request("other", prompt[:7], SamplingParams(max_tokens=3, temperature=0.0))
    while engine.has_unfinished:
        for out in engine.step().outputs:
            outputs.setdefault(out.request_id, []).append(out)
    got = [lp for out in outputs["asks"] for lp in out.prompt_logprobs]
    assert outputs["asks"][0].prompt_logprobs and not any(out.prompt_logprobs for out in outputs["asks"][1:])
    assert not any(out.prompt_logprobs for out in outputs["other"])
    expected = reference(prompt)
    assert [lp.token_id for lp in got] == prompt[1:]
    for i, lp in enumerate(got):
        assert lp.logprob == pytest.approx(expected[i, prompt[i + 1]].item(), abs=1e-4)
        values, ids = torch.topk(expected[i], 2)
        assert [t for t, _ in lp.top] == ids.tolist()
    # The sampled tokens are those of a request that did not ask.
    engine.add_request("plain", prompt, SamplingParams(max_tokens=3, temperature=0.0))
    plain = []
    while engine.has_unfinished:
        plain += [t for out in engine.step().outputs for t in out.new_token_ids]
    assert [t for out in outputs["asks"] for t in out.new_token_ids] == plain


def test_bad_prompt_logprobs_are_refused():
    with pytest.raises(InvalidRequestError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
