"""Speculative decoding keeps greedy output token for token: n-gram and draft proposers, offline.

Proposals only change how many target steps the tokens take, never which tokens: each run
is checked against the same engine without speculation and against transformers, and the
proposers must actually have proposed (and had some accepted) for the check to mean anything.
"""
from __future__ import annotations

import random

import pytest
import torch

from splitserve.config import (
    CacheConfig,
    ConfigError,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.speculative.ngram import NgramProposer

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
ON_GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])


def make(model_dir, spec: SpeculativeConfig, num_blocks: int = 256, max_num_batched_tokens: int = 2048, device: str = "cpu") -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=ModelConfig(model_dir, dtype=torch.float32, device=device),
            cache=CacheConfig(block_size=4, num_blocks=num_blocks),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens),
            speculative=spec,
        )
    )


def run(engine: LLMEngine, prompts, params=GREEDY) -> dict[str, list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    tokens: dict[str, list[int]] = {}
    for _ in range(10_000):
        if not engine.has_unfinished:
            break
        for out in engine.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks, "blocks leaked"
    assert engine.kv_cache_manager.num_requests == 0
    return tokens


def copy_heavy_prompts(seed: int, n: int = 4) -> list[list[int]]:
    """Prompts that repeat a phrase: prompt lookup finds the continuation in them."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        phrase = [rng.randrange(1, 1000) for _ in range(rng.randrange(5, 12))]
        prompts.append([rng.randrange(1, 1000) for _ in range(rng.randrange(0, 6))] + phrase * 3)
    return prompts


def test_ngram_proposer_takes_the_longest_most_recent_match():
    proposer = NgramProposer(ngram_min=1, ngram_max=3)
    assert proposer.propose([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2) == [7, 5]  # the later "1 2 3"
    assert proposer.propose([4, 2, 3, 8, 6, 2, 3], 3) == [8, 6, 2]  # "2 3" beats the 1-gram "3"
    assert proposer.propose([5, 6, 7], 2) == []
    assert proposer.propose([1, 2, 1], 4) == [2, 1]  # runs to the end of the context
    assert NgramProposer(ngram_min=2, ngram_max=2).propose([7, 1, 7], 2) == []  # a 1-gram is too short


def test_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="method"):
        SpeculativeConfig(method="eagle")
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=0)
    with pytest.raises(ConfigError, match="draft model"):
        SpeculativeConfig(method="draft")


@pytest.mark.parametrize(("arch", "device"), [("llama", "cpu"), ("qwen3", "cpu"), pytest.param("llama", ON_GPU.values[0], marks=ON_GPU.marks)])
def test_ngram_greedy_identical(arch, device, tiny_checkpoint, hf_reference):
    model_dir = tiny_checkpoint(arch)
    prompts = copy_heavy_prompts(seed=1)
    plain = run(make(model_dir, SpeculativeConfig()), prompts)
    engine = make(model_dir, SpeculativeConfig(method="ngram", num_speculative_tokens=4), device=device)
    spec = run(engine, prompts)
    assert spec == plain
    for i, prompt in enumerate(prompts):
        assert spec[f"r{i}"] == hf_reference.tokens(model_dir, prompt, GREEDY.max_tokens)
    stats = engine.stats().spec
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
    assert stats.mean_accepted_length > 1.0


def test_ngram_greedy_identical_under_preemption_and_chunking(llama_tiny_dir):
    """A pool too small for all requests at once (preemptions), a token budget that cuts proposals."""
    prompts = copy_heavy_prompts(seed=2, n=6)
    plain = run(make(llama_tiny_dir, SpeculativeConfig(), num_blocks=40, max_num_batched_tokens=24), prompts)
    engine = make(llama_tiny_dir, SpeculativeConfig(method="ngram", num_speculative_tokens=5), num_blocks=40, max_num_batched_tokens=24)
    assert run(engine, prompts) == plain
    assert engine.stats().num_preemptions > 0
    assert engine.stats().spec.num_accepted_tokens > 0


def test_host_sampled_requests_share_a_speculative_step(llama_tiny_dir):
    """Logprobs need the host sampler: such a request gets no proposals, yet runs in the same steps
    as one that has them, and its tokens and logprobs are those of a run without speculation."""
    prompts = copy_heavy_prompts(seed=3, n=2)
    params = [GREEDY, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)]

    def outputs(spec):
        engine = make(llama_tiny_dir, spec)
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(f"r{i}", prompt, p)
        got: dict[str, list] = {}
        while engine.has_unfinished:
            for out in engine.step().outputs:
                got.setdefault(out.request_id, []).extend(zip(out.new_token_ids, out.new_logprobs or [None] * len(out.new_token_ids)))
        return got, engine

    plain, _ = outputs(SpeculativeConfig())
    spec, engine = outputs(SpeculativeConfig(method="ngram", num_speculative_tokens=3))
    assert [t for t, _ in spec["r0"]] == [t for t, _ in plain["r0"]]
    assert [t for t, _ in spec["r1"]] == [t for t, _ in plain["r1"]]
    for (_, a), (_, b) in zip(spec["r1"], plain["r1"]):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
    assert engine.stats().spec.num_accepted_tokens > 0


@pytest.mark.parametrize("num_layers", [None, 1])
@pytest.mark.parametrize("device", ["cpu", ON_GPU])
def test_draft_greedy_identical(num_layers, device, llama_tiny_dir, tmp_path_factory, hf_reference):
    """The target as its own draft (every proposal accepted), and its first layer alone (most rejected)."""
    draft_dir = llama_tiny_dir
    if num_layers is not None:
        from splitserve.models.checkpoint_init import init_checkpoint

        draft_dir = init_checkpoint(tmp_path_factory.mktemp("draft") / "llama-1layer", "llama", "tiny", overrides={"num_hidden_layers": num_layers})
    rng = random.Random(4)
    prompts = [[rng.randrange(1, 1000) for _ in range(n)] for n in (3, 11, 29, 6)]
    plain = run(make(llama_tiny_dir, SpeculativeConfig()), prompts)  # on the CPU: the reference
    engine = make(llama_tiny_dir, SpeculativeConfig(method="draft", num_speculative_tokens=4, draft_model=draft_dir), num_blocks=80, device=device)
    assert run(engine, prompts) == plain
    assert plain["r2"] == hf_reference.tokens(llama_tiny_dir, prompts[2], GREEDY.max_tokens)
    stats = engine.stats().spec
    assert stats.num_draft_tokens > 0
    if num_layers is None:
        assert stats.acceptance_rate == 1.0
        assert stats.mean_accepted_length > 4.0  # K + 1 = 5, except near max_tokens where fewer are proposed
    else:
        assert stats.acceptance_rate < 1.0


def test_draft_catches_up_on_long_contexts_within_the_budget(llama_tiny_dir):
    """Prompts far longer than the token budget: the target prefills them in chunks, the draft
    then rebuilds their KV over several steps (no proposal until it has), output unchanged."""
    rng = random.Random(6)
    prompts = [[rng.randrange(1, 1000) for _ in range(n)] for n in (70, 45, 5)]
    plain = run(make(llama_tiny_dir, SpeculativeConfig(), max_num_batched_tokens=16), prompts)
    spec = SpeculativeConfig(method="draft", num_speculative_tokens=3, draft_model=llama_tiny_dir)
    engine = make(llama_tiny_dir, spec, max_num_batched_tokens=16)
    assert run(engine, prompts) == plain
    stats = engine.stats().spec
    assert stats.num_accepted_tokens > 0.9 * stats.num_draft_tokens > 0


def test_draft_vocabulary_must_match(llama_tiny_dir, tiny_checkpoint):
    with pytest.raises(ConfigError, match="vocabulary"):
        make(llama_tiny_dir, SpeculativeConfig(method="draft", draft_model=tiny_checkpoint("qwen3")))


def test_ngram_proposer_agrees_with_a_plain_search():
    """Against the obvious quadratic search, on small alphabets where matches abound."""
    rng = random.Random(8)
    for _ in range(500):
        context = [rng.randrange(3) for _ in range(rng.randrange(1, 30))]
        lo, hi = rng.randrange(1, 3), rng.randrange(3, 6)
        expected = []
        for n in range(min(hi, len(context) - 1), lo - 1, -1):
            starts = [s for s in range(len(context) - n) if context[s : s + n] == context[-n:]]
            if starts:
                expected = context[starts[-1] + n : starts[-1] + n + 3]
                break
        assert NgramProposer(lo, hi).propose(context, 3) == expected, (context, lo, hi)
