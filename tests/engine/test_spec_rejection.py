"""The accept-or-resample rule keeps the target's distribution: chi-square tests that can fail.

At the rule: many independent rows with the same target distributions and proposals; the
first emitted token must follow p0 and, after an accepted proposal, the next one p1. The same
test rejects a wrong rule (drawing from p again on rejection, without removing the proposed
token), so it has the power to catch one. Through the engine: sampled requests with n-gram
proposals on the tiny model, the joint law of their first three tokens against transformers'.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import chisquare

from splitserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.speculative.rejection import target_probs, verify

VOCAB = 8
N = 20_000
ALPHA = 1e-4  # a correct rule fails one run in 10,000


def chi_square_p(samples: list[int], probs: torch.Tensor) -> float:
    """P-value of the samples against ``probs``, bins with an expected count under 5 merged into one."""
    counts = torch.bincount(torch.tensor(samples), minlength=len(probs)).double()
    expected = probs.double() * len(samples)
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().unsqueeze(0)])
    wanted = torch.cat([expected[big], expected[~big].sum().unsqueeze(0)])
    if wanted[-1] == 0:
        assert observed[-1] == 0, "a token with probability 0 was drawn"
        observed, wanted = observed[:-1], wanted[:-1]
    return chisquare(observed.numpy(), wanted.numpy() * observed.sum().item() / wanted.sum().item()).pvalue


def wrong_rule(logits, requests, proposals, generator):
    """Like ``verify``, but a rejection draws from p itself: the proposed token is favoured."""
    out = []
    probs = target_probs(logits, [r.sampling_params for r in requests for _ in range(3)])
    for i, p in enumerate(proposals):
        rows = probs[3 * i : 3 * i + 3]
        tokens = []
        for j, d in enumerate(p):
            if torch.rand((), generator=generator) < rows[j, d]:
                tokens.append(d)
                continue
            tokens.append(int(torch.multinomial(rows[j], 1, generator=generator)))
            break
        else:
            tokens.append(int(torch.multinomial(rows[len(p)], 1, generator=generator)))
        out.append(SimpleNamespace(token_ids=tokens))
    return out


@pytest.fixture(scope="module")
def case():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, VOCAB, generator=gen) * 1.5  # after the newest token, after d0, after d1
    params = SamplingParams(temperature=0.8, top_k=6)
    requests = [SimpleNamespace(sampling_params=params)] * N
    proposals = [[int(logits[0].argsort()[-2]), int(logits[1].argmax())]] * N  # likely but not the likeliest, then the likeliest
    probs = target_probs(logits, [params] * 3)
    return logits, requests, proposals, probs


def first_and_second(results, d0):
    first = [r.token_ids[0] for r in results]
    second = [r.token_ids[1] for r in results if r.token_ids[0] == d0 and len(r.token_ids) > 1]
    return first, second


def test_rule_keeps_the_target_distribution(case):
    logits, requests, proposals, probs = case
    results = verify(logits.repeat(N, 1), requests, proposals, torch.Generator().manual_seed(1))
    first, second = first_and_second(results, proposals[0][0])
    assert chi_square_p(first, probs[0]) > ALPHA
    assert len(second) > 1000
    assert chi_square_p(second, probs[1]) > ALPHA
    assert all(probs[0][t] > 0 for t in first)  # top-k: nothing outside the six likeliest
    accepted = sum(r.num_accepted for r in results) / N
    assert 0.2 < accepted < 1.9  # both branches ran: some accepted, some rejected


def test_a_wrong_rule_is_caught(case):
    logits, requests, proposals, probs = case
    results = wrong_rule(logits.repeat(N, 1), requests[:N], proposals, torch.Generator().manual_seed(1))
    first, _ = first_and_second(results, proposals[0][0])
    assert chi_square_p(first, probs[0]) < ALPHA


def test_greedy_rows_accept_only_the_argmax(case):
    logits, _, _, _ = case
    greedy = [SimpleNamespace(sampling_params=SamplingParams(temperature=0.0))] * 3
    best = [int(logits[j].argmax()) for j in range(3)]
    wrong = (best[0] + 1) % VOCAB
    results = verify(torch.cat([logits, logits, logits[:1]]), greedy, [[best[0], best[1]], [wrong, best[1]], []], None)
    assert results[0].token_ids == [best[0], best[1], best[2]] and results[0].num_accepted == 2
    assert results[1].token_ids == [best[0]] and results[1].num_accepted == 0
    assert results[2].token_ids == [best[0]] and results[2].num_proposed == 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_engine_samples_the_target_distribution(method, llama_tiny_dir, hf_reference):
    """4,000 sampled requests (top-k 4) with proposals: the law of their first three tokens
    (at most 64 outcomes) is the one transformers' logits give, computed exactly. The draft is
    the target itself (its greedy proposals are accepted with chance p(argmax))."""
    rng = random.Random(7)
    model = hf_reference.model(llama_tiny_dir)
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=4, ignore_eos=True)

    def dist(context):
        with torch.inference_mode():
            logits = model(torch.tensor([context])).logits[0, -1].float()
        return target_probs(logits.unsqueeze(0), [params])[0]

    prompt = [rng.randrange(1, 1000) for _ in range(6)] * 3
    if method == "ngram":
        # Put each likely first token in the prompt, followed by its likeliest successor, so that
        # prompt lookup proposes something worth checking after it.
        lead = []
        for c in dist(prompt).nonzero().flatten().tolist():
            lead += [c, int(dist(prompt + [c]).argmax())]
        prompt = lead + prompt
    # The exact joint law of (t1, t2, t3) over the top-4 supports.
    joint: dict[tuple[int, ...], float] = {}
    p1 = dist(prompt)
    for t1 in p1.nonzero().flatten().tolist():
        p2 = dist(prompt + [t1])
        for t2 in p2.nonzero().flatten().tolist():
            p3 = dist(prompt + [t1, t2])
            for t3 in p3.nonzero().flatten().tolist():
                joint[t1, t2, t3] = p1[t1].item() * p2[t2].item() * p3[t3].item()
    engine = LLMEngine(
        EngineConfig(
            model=ModelConfig(llama_tiny_dir, dtype=torch.float32),
            cache=CacheConfig(block_size=4, num_blocks=4096),
            scheduler=SchedulerConfig(max_num_seqs=512, max_num_batched_tokens=8192, max_waiting=8192),
            speculative=SpeculativeConfig(
                method=method, num_speculative_tokens=2, draft_model=llama_tiny_dir if method == "draft" else None
            ),
        )
    )
    n = 4000
    for i in range(n):
        engine.add_request(f"r{i}", prompt, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished:
        for out in engine.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    outcomes = sorted(joint)
    index = {o: i for i, o in enumerate(outcomes)}
    samples = [index[tuple(t)] for t in tokens.values()]  # KeyError: an outcome the target cannot produce
    probs = torch.tensor([joint[o] for o in outcomes])
    assert chi_square_p(samples, probs / probs.sum()) > ALPHA
    stats = engine.stats().spec
    assert stats.num_verifications > n / 4
    assert 0.1 * stats.num_draft_tokens < stats.num_accepted_tokens < stats.num_draft_tokens  # both branches ran
