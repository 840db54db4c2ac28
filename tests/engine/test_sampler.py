"""Sampling: seeds, truncation (top-k, top-p, min-p), penalties, logprobs and stop conditions.

Unit tests run the Sampler on crafted logits; the engine tests at the end run a tiny model.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from splitserve.engine.request import FinishReason, Request
from splitserve.engine.sampler import Sampler, apply_penalties, truncate_rows
from splitserve.engine.sampling_params import SamplingParams

VOCAB = 64


def request(params: SamplingParams, prompt=(1, 2, 3), output=(), eos=frozenset(), request_id="r") -> Request:
    r = Request(request_id, list(prompt), params, eos)
    for token in output:
        r.append_output(token)
    return r


def draws(sampler: Sampler, logits: torch.Tensor, r: Request, n: int) -> list[int]:
    """``n`` consecutive tokens of one request (a seeded request's draws are keyed by position)."""
    tokens = []
    for _ in range(n):
        token = sampler(logits.unsqueeze(0), [r])[0][0]
        r.append_output(token)
        tokens.append(token)
    return tokens


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(0))


def test_same_seed_same_tokens_different_seeds_differ(logits):
    flat = logits / 4  # spread out, so different seeds show
    a = draws(Sampler(), flat, request(SamplingParams(seed=7)), 30)
    b = draws(Sampler(seed=99), flat, request(SamplingParams(seed=7)), 30)  # the engine's own seed does not matter
    c = draws(Sampler(), flat, request(SamplingParams(seed=8)), 30)
    assert a == b
    assert a != c


def test_unseeded_requests_follow_the_engine_generator(logits):
    assert draws(Sampler(seed=1), logits, request(SamplingParams()), 20) == draws(Sampler(seed=1), logits, request(SamplingParams()), 20)


def test_greedy_is_argmax(logits):
    batch = torch.stack([logits, -logits])
    out = Sampler()(batch, [request(SamplingParams(temperature=0.0)), request(SamplingParams(temperature=0.0))])
    assert [t for t, _ in out] == [int(logits.argmax()), int((-logits).argmax())]


@pytest.mark.parametrize("params", [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0)], ids=["top_k=1", "top_p~0", "min_p=1"])
def test_truncation_to_one_token_equals_greedy(logits, params):
    assert set(draws(Sampler(), logits, request(params), 50)) == {int(logits.argmax())}


def reference_truncate(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """One row at a time, as the definitions read (the sampler's own is batched, with one sort):
    top-k keeps ties with the k-th, top-p keeps a token while the mass before it is below top_p
    (the most likely always), min-p drops what is below min_p times the top probability."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def truncate_one(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    return truncate_rows(logits.unsqueeze(0), torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))[0]


# probabilities 0.5, 0.3, 0.15, 0.05 over tokens 0..3, nothing elsewhere
CRAFTED = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


@pytest.mark.parametrize(
    "top_k, top_p, min_p, kept",
    [
        (2, 1.0, 0.0, {0, 1}),
        (3, 1.0, 0.0, {0, 1, 2}),
        (0, 0.7, 0.0, {0, 1}),  # the mass before token 1 is 0.5 < 0.7, before token 2 0.8
        (0, 0.45, 0.0, {0}),  # the mass before token 1 is 0.5
        (0, 0.81, 0.0, {0, 1, 2}),
        (0, 1.0, 0.5, {0, 1}),  # floor 0.25
        (0, 1.0, 0.2, {0, 1, 2}),  # floor 0.1
        (3, 0.9, 0.5, {0, 1}),
    ],
)
def test_truncate_keeps_the_right_tokens(top_k, top_p, min_p, kept):
    out = truncate_one(CRAFTED.clone(), top_k, top_p, min_p)
    assert {i for i in range(4) if out[i] > -math.inf} == kept
    assert torch.equal(out[list(kept)], CRAFTED[list(kept)])  # survivors are untouched


TRUNCATIONS = [(2, 1.0, 0.0), (3, 1.0, 0.0), (0, 0.7, 0.0), (0, 0.45, 0.0), (0, 0.81, 0.0), (0, 1.0, 0.5), (0, 1.0, 0.2), (3, 0.9, 0.5), (0, 1.0, 0.0)]


def test_batched_truncation_keeps_what_the_definitions_keep():
    # One batch of rows with different limits, on crafted and on random logits of a real vocabulary size.
    for logits in (CRAFTED.repeat(len(TRUNCATIONS), 1), torch.randn(len(TRUNCATIONS), 32000, generator=torch.Generator().manual_seed(3))):
        limits = torch.tensor(TRUNCATIONS)
        batched = truncate_rows(logits.clone(), limits[:, 0].long(), limits[:, 1], limits[:, 2])
        for row, (top_k, top_p, min_p) in enumerate(TRUNCATIONS):
            assert torch.equal(batched[row], reference_truncate(logits[row].clone(), int(top_k), top_p, min_p)), TRUNCATIONS[row]


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_one_batched_draw_follows_each_rows_own_distribution(device):
    # 3000 rows per setting in one call: each row's token is an independent draw from its own truncated distribution.
    settings = {
        "top_k=3": (SamplingParams(top_k=3), {0: 0.5 / 0.95, 1: 0.3 / 0.95, 2: 0.15 / 0.95}),
        "top_p=0.7": (SamplingParams(top_p=0.7), {0: 0.5 / 0.8, 1: 0.3 / 0.8}),
        "min_p=0.2": (SamplingParams(min_p=0.2), {0: 0.5 / 0.95, 1: 0.3 / 0.95, 2: 0.15 / 0.95}),
        "plain": (SamplingParams(), {0: 0.5, 1: 0.3, 2: 0.15, 3: 0.05}),
        "greedy": (SamplingParams(temperature=0.0), {0: 1.0}),
    }
    n = 3000
    requests = [request(params, request_id=f"{name}-{i}") for name, (params, _) in settings.items() for i in range(n)]
    sampler = Sampler()
    assert sampler.samples_on_device(requests)
    tokens = sampler.sample_on_device(CRAFTED.repeat(len(requests), 1).to(device), requests).tolist()
    for k, (name, (_, expected)) in enumerate(settings.items()):
        counts = Counter(tokens[k * n : (k + 1) * n])
        assert set(counts) == set(expected), name
        for token, p in expected.items():
            assert counts[token] / n == pytest.approx(p, abs=0.03), (name, token)


def test_batched_temperature_sharpens_and_flattens():
    hot, cold = SamplingParams(temperature=2.0), SamplingParams(temperature=0.25)
    requests = [request(hot)] * 2000 + [request(cold)] * 2000
    tokens = Sampler().sample_on_device(CRAFTED.repeat(4000, 1), requests).tolist()
    # p^(1/T), renormalised: token 0 has 0.379 of the mass at T=2, 0.879 at T=0.25.
    assert Counter(tokens[:2000])[0] / 2000 == pytest.approx(0.379, abs=0.03)
    assert Counter(tokens[2000:])[0] / 2000 == pytest.approx(0.879, abs=0.03)


def test_seeded_penalised_and_logprob_requests_are_sampled_on_the_host():
    assert Sampler.samples_on_device([request(SamplingParams()), request(SamplingParams(temperature=0.0))])
    for params in (SamplingParams(seed=1), SamplingParams(repetition_penalty=1.2), SamplingParams(logprobs=True)):
        assert not Sampler.samples_on_device([request(SamplingParams()), request(params)])


def test_sampling_stays_inside_the_truncated_set_and_follows_the_distribution():
    tokens = draws(Sampler(), CRAFTED, request(SamplingParams(top_k=3, seed=0)), 2000)
    counts = Counter(tokens)
    assert set(counts) == {0, 1, 2}
    # Renormalised over the top 3: 0.5/0.95, 0.3/0.95, 0.15/0.95.
    for token, p in {0: 0.526, 1: 0.316, 2: 0.158}.items():
        assert counts[token] / 2000 == pytest.approx(p, abs=0.05)


def test_low_temperature_concentrates_on_the_top_token():
    hot = Counter(draws(Sampler(), CRAFTED, request(SamplingParams(temperature=2.0, seed=0)), 500))
    cold = Counter(draws(Sampler(), CRAFTED, request(SamplingParams(temperature=0.1, seed=0)), 500))
    assert cold[0] > 490 and hot[0] < 350


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0, 2.0])
    r = request(SamplingParams(repetition_penalty=2.0), prompt=[0], output=[1, 1])
    assert apply_penalties(logits.clone(), r).tolist() == [1.0, -4.0, 2.0, -2.0, 2.0]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(5)
    r = request(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=[4, 4], output=[1, 1, 2])
    # token 1: twice -> -(0.25 * 2) - 0.5; token 2: once -> -0.25 - 0.5; prompt token 4 untouched.
    assert apply_penalties(logits, r).tolist() == [0.0, -1.0, -0.75, 0.0, 0.0]


def test_negative_presence_penalty_encourages_repeats():
    r = request(SamplingParams(presence_penalty=-1.0), output=[3])
    assert apply_penalties(torch.zeros(5), r).tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]


def test_penalties_change_what_greedy_picks():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    plain = Sampler()(logits, [request(SamplingParams(temperature=0.0), prompt=[0])])
    penalised = Sampler()(logits, [request(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=[0])])
    assert plain[0][0] == 0 and penalised[0][0] == 1  # 3 / 2 < 2


def test_penalties_do_not_touch_other_rows_of_the_batch():
    logits = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    before = logits.clone()
    out = Sampler()(logits, [request(SamplingParams(temperature=0.0, frequency_penalty=2.0), output=[0]), request(SamplingParams(temperature=0.0))])
    assert [t for t, _ in out] == [1, 0]
    assert torch.equal(logits, before)  # the caller's logits are not modified


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    (token, lp), = Sampler()(logits, [request(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2, repetition_penalty=1.5))])
    expected = torch.log_softmax(logits[0], -1)
    assert token == 1 and lp.token_id == 1
    assert lp.logprob == pytest.approx(expected[1].item())
    assert [t for t, _ in lp.top] == [1, 2]
    assert [v for _, v in lp.top] == pytest.approx([expected[1].item(), expected[2].item()])
    (_, none), = Sampler()(logits, [request(SamplingParams(temperature=0.0))])
    assert none is None
    (_, no_top), = Sampler()(logits, [request(SamplingParams(temperature=0.0, logprobs=True))])
    assert no_top.top == ()


@pytest.mark.parametrize(
    "params, output, reason",
    [
        (SamplingParams(max_tokens=3), [5, 6], None),
        (SamplingParams(max_tokens=3), [5, 6, 7], FinishReason.LENGTH),
        (SamplingParams(max_tokens=9), [5, 2], FinishReason.STOP),  # EOS
        (SamplingParams(max_tokens=9, ignore_eos=True), [5, 2], None),
        (SamplingParams(max_tokens=9, ignore_eos=True, stop_token_ids=[6]), [5, 6], FinishReason.STOP),
        (SamplingParams(max_tokens=2, stop_token_ids=[6]), [5, 6], FinishReason.STOP),  # stop wins over length
    ],
)
def test_stop_conditions(params, output, reason):
    r = request(params, output=output, eos=frozenset({2}))
    assert r.check_stop(max_model_len=100) == reason


def test_context_length_ends_a_request():
    r = request(SamplingParams(max_tokens=50), prompt=list(range(8)), output=[1, 1])
    assert r.check_stop(max_model_len=11) is None
    r.append_output(1)
    assert r.check_stop(max_model_len=11) == FinishReason.LENGTH


# -- the engine, on a tiny model ----------------------------------------------------------

PROMPT = [17, 250, 3, 999, 42, 8, 8, 100, 7]


def outputs_of(engine, request_ids):
    result = {r: [] for r in request_ids}
    reasons = {}
    while engine.has_unfinished:
        for out in engine.step().outputs:
            result[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return result, reasons


def test_engine_seeded_sampling_reproduces_across_runs_and_batches(llama_tiny_dir, make_engine):
    seeded = SamplingParams(max_tokens=12, seed=1234, ignore_eos=True)
    first = make_engine(llama_tiny_dir)
    first.add_request("a", PROMPT, seeded)
    (alone, _) = outputs_of(first, ["a"])

    second = make_engine(llama_tiny_dir, max_num_batched_tokens=5)  # other chunking, other company
    second.add_request("noise", PROMPT[::-1], SamplingParams(max_tokens=12, ignore_eos=True))
    second.add_request("a", PROMPT, seeded)
    second.add_request("b", PROMPT, SamplingParams(max_tokens=12, seed=1235, ignore_eos=True))
    batched, _ = outputs_of(second, ["noise", "a", "b"])

    assert batched["a"] == alone["a"] and len(alone["a"]) == 12
    assert batched["b"] != alone["a"]


def test_engine_finish_reasons(llama_tiny_dir, make_engine):
    engine = make_engine(llama_tiny_dir)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.add_request("ref", PROMPT, greedy)
    reference, reasons = outputs_of(engine, ["ref"])
    reference = reference["ref"]
    assert reasons["ref"] == FinishReason.LENGTH and len(reference) == 8
    stop_at = next(i for i, t in enumerate(reference) if i >= 2 and t not in reference[:i])

    engine.add_request("stop", PROMPT, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[reference[stop_at]]))
    # Make the same token the model's EOS: ignore_eos decides whether it ends the request.
    engine.eos_token_ids = frozenset({reference[stop_at]})
    engine.add_request("eos", PROMPT, SamplingParams(max_tokens=8, temperature=0.0))
    engine.add_request("ignore", PROMPT, greedy)
    got, reasons = outputs_of(engine, ["stop", "eos", "ignore"])

    assert got["stop"] == got["eos"] == reference[: stop_at + 1]  # the stop token itself is returned
    assert reasons["stop"] == reasons["eos"] == FinishReason.STOP
    assert got["ignore"] == reference and reasons["ignore"] == FinishReason.LENGTH


def test_engine_stops_at_the_context_length(llama_tiny_dir, make_engine):
    engine = make_engine(llama_tiny_dir, max_model_len=12)
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    got, reasons = outputs_of(engine, ["r"])
    assert len(got["r"]) == 12 - len(PROMPT) and reasons["r"] == FinishReason.LENGTH
