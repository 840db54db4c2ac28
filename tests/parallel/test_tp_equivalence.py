"""TP=2 (two real processes, gloo) computes what TP=1 and transformers compute.

Tiny random checkpoints of each architecture in fp32; their head, KV head, intermediate and
vocabulary sizes divide by 2. Greedy tokens must be identical; logits agree to float noise
(the all-reduce sums partial products in another order).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from splitserve.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from splitserve.models.checkpoint_init import init_checkpoint
from splitserve.parallel import TPModelRunner

# Different lengths, two sharing a prefix (a prefix-cache hit), one past Mistral's 64-token window.
PROMPTS = [list(range(3, 103)), list(range(3, 40)) + [7, 8], [5, 9, 11, 200], list(range(300, 333))]
MAX_TOKENS = 8


def engine_config(model_dir, tp_size: int) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model_dir, dtype=torch.float32),
        cache=CacheConfig(block_size=4, num_blocks=160),
        # A small token budget: prompts are prefilled in chunks, and batched with decodes.
        scheduler=SchedulerConfig(max_num_batched_tokens=48),
        parallel=ParallelConfig(tensor_parallel_size=tp_size),
    )


def generate(engine: LLMEngine) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished:
        for out in engine.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return [tokens[str(i)] for i in range(len(PROMPTS))]


def prefill_logits(runner) -> torch.Tensor:
    """The last-position logits of PROMPTS[0], computed in one step into blocks 0..24."""
    prompt = PROMPTS[0]
    step = SchedulerOutput([ScheduledRequest("r", prompt, 0, list(range(25)), True)])
    return runner.execute(step)


def check_tp2_against_tp1_and_transformers(model_dir, hf_reference) -> TPModelRunner:
    config1, config2 = engine_config(model_dir, 1), engine_config(model_dir, 2)
    tp1 = ModelRunner(config1.model, config1.cache)
    expected = generate(LLMEngine(config1, tp1))
    runner = TPModelRunner(config2.model, config2.cache, config2.parallel)
    try:
        assert generate(LLMEngine(config2, runner)) == expected
        # Async scheduling: rank 0 broadcasts the tokens its placeholders stand for to the other ranks.
        overlapped = dataclasses.replace(config2, scheduler=dataclasses.replace(config2.scheduler, async_scheduling=True))
        engine = LLMEngine(overlapped, runner)
        assert engine.async_scheduling
        assert generate(engine) == expected
        torch.testing.assert_close(prefill_logits(runner), prefill_logits(tp1), rtol=1e-4, atol=1e-4)
    except BaseException:
        runner.close()
        raise
    for prompt, tokens in zip(PROMPTS, expected):
        assert tokens == hf_reference.tokens(model_dir, prompt, MAX_TOKENS)
    return runner


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_tp2_greedy_is_token_exact_with_tp1_and_transformers(arch, tiny_checkpoint, hf_reference):
    runner = check_tp2_against_tp1_and_transformers(tiny_checkpoint(arch), hf_reference)
    try:
        attn = runner.local.model.layers[0].self_attn
        arch_config = runner.arch
        assert (attn.num_heads, attn.num_kv_heads) == (arch_config.num_heads // 2, arch_config.num_kv_heads // 2)
        assert runner.kv_cache.shape[1] == arch_config.num_kv_heads // 2  # rank 0 holds half the KV heads
    finally:
        runner.close()


def test_kv_heads_are_replicated_and_the_vocabulary_padded(tmp_path, hf_reference):
    # One KV head for two ranks (each keeps a copy), and a vocabulary of 1027 rows: 514 per
    # rank, the last row of rank 1 padding that the gathered logits must not show.
    model_dir = init_checkpoint(tmp_path / "llama-kv1", "llama", overrides={"num_key_value_heads": 1, "vocab_size": 1027})
    runner = check_tp2_against_tp1_and_transformers(model_dir, hf_reference)
    try:
        assert runner.kv_cache.shape[1] == 1
        assert runner.local.model.layers[0].self_attn.num_kv_heads == 1
        assert runner.local.model.lm_head.weight.shape[0] == 514
        assert prefill_logits(runner).shape == (1, 1027)
    finally:
        runner.close()
