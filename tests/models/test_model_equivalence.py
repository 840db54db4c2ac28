"""The engine computes what transformers computes: greedy tokens and logprobs, fp32, all four architectures.

Each architecture's tiny preset carries its peculiarity (llama3 RoPE scaling, Qwen2
biases and tied embeddings, Qwen3 q/k norms and an explicit head_dim, Mistral's
64-token sliding window, which its prompts here cross). The engine runs with
4-token blocks so that short prompts span partial and several blocks.
"""
from __future__ import annotations

import random

import pytest
import torch

from splitserve.engine.sampling_params import SamplingParams

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
BLOCK_SIZE = 4
MAX_NEW = 10
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)


def prompts_for(arch: str) -> list[list[int]]:
    """Prompts of different lengths: under one block, exactly one, several; Mistral's cross its window."""
    lengths = (3, 4, 9, 22, 37) if arch != "mistral" else (3, 9, 37, 70, 90)
    rng = random.Random(arch)
    return [[rng.randrange(3, 1000) for _ in range(n)] for n in lengths]


def shared_prefix_prompt(arch: str) -> tuple[list[int], list[int], int]:
    """A long prompt, a second one sharing most of it, and the tokens the shared full blocks hold."""
    first = prompts_for(arch)[-1]
    num_shared = len(first) - 7
    second = first[:num_shared] + [11, 12, 13, 14, 15]
    return first, second, num_shared // BLOCK_SIZE * BLOCK_SIZE


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models: one thread is as fast alone and far faster when other work shares the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=ARCHS)
def arch_dir(request, tiny_checkpoint):
    return request.param, tiny_checkpoint(request.param)


def submit(engine, prompts, params=GREEDY, prefix="r"):
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{prefix}{i}", prompt, params)
    return [f"{prefix}{i}" for i in range(len(prompts))]


def assert_all_blocks_free(engine):
    assert engine.kv_cache_manager.num_requests == 0
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks
    assert all(b.ref_cnt == 0 for b in engine.block_pool.blocks)


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 7], ids=["whole-prompts", "chunked-prefill"])
def test_batch_matches_transformers(arch_dir, max_num_batched_tokens, make_engine, run_engine, hf_reference):
    arch, model_dir = arch_dir
    prompts = prompts_for(arch)
    engine = make_engine(model_dir, block_size=BLOCK_SIZE, max_num_batched_tokens=max_num_batched_tokens)
    batch_sizes = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        batch_sizes.append(out.num_batched_tokens)
        return out

    engine.scheduler.schedule = recording_schedule
    ids = submit(engine, prompts)
    tokens = run_engine(engine)

    for request_id, prompt in zip(ids, prompts):
        assert tokens[request_id] == hf_reference.tokens(model_dir, prompt, MAX_NEW), (arch, len(prompt))
    assert max(batch_sizes) <= max_num_batched_tokens
    if max_num_batched_tokens == 7:
        assert engine.scheduler.num_prompt_tokens_computed == sum(map(len, prompts))  # nothing computed twice
    else:
        assert batch_sizes[0] == sum(map(len, prompts))  # every prompt whole in the first step
    assert_all_blocks_free(engine)


def test_prefix_cache_hit_is_exact(arch_dir, make_engine, run_engine, hf_reference):
    arch, model_dir = arch_dir
    first, second, num_hit_tokens = shared_prefix_prompt(arch)
    engine = make_engine(model_dir, block_size=BLOCK_SIZE)

    engine.add_request("first", first, GREEDY)
    assert run_engine(engine)["first"] == hf_reference.tokens(model_dir, first, MAX_NEW)
    engine.add_request("second", second, GREEDY)
    outputs = []
    while engine.has_unfinished:
        outputs += engine.step().outputs

    assert [t for o in outputs for t in o.new_token_ids] == hf_reference.tokens(model_dir, second, MAX_NEW)
    assert outputs[-1].num_cached_tokens == num_hit_tokens > 0
    assert engine.scheduler.num_prompt_tokens_computed == len(first) + len(second) - num_hit_tokens
    assert_all_blocks_free(engine)


def test_preemption_is_exact(arch_dir, make_engine, run_engine, hf_reference):
    arch, model_dir = arch_dir
    prompts = prompts_for(arch)
    # Every prompt fits at once but their growth while decoding does not; the longest fits alone.
    prompt_blocks = sum(-(-len(p) // BLOCK_SIZE) for p in prompts)
    longest_blocks = -(-(max(map(len, prompts)) + MAX_NEW) // BLOCK_SIZE)
    engine = make_engine(model_dir, block_size=BLOCK_SIZE, num_blocks=max(prompt_blocks + 1, longest_blocks))
    ids = submit(engine, prompts)
    tokens = run_engine(engine)

    assert engine.scheduler.num_preemptions > 0
    for request_id, prompt in zip(ids, prompts):
        assert tokens[request_id] == hf_reference.tokens(model_dir, prompt, MAX_NEW), (arch, len(prompt))
    assert_all_blocks_free(engine)


def test_logprobs_match_transformers(arch_dir, make_engine, hf_reference):
    arch, model_dir = arch_dir
    prompts = prompts_for(arch)[1::2]
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=5)
    engine = make_engine(model_dir, block_size=BLOCK_SIZE, max_num_batched_tokens=16)
    ids = submit(engine, prompts, params)
    logprobs = {i: [] for i in ids}
    while engine.has_unfinished:
        for out in engine.step().outputs:
            assert len(out.new_logprobs) == len(out.new_token_ids) == 1
            logprobs[out.request_id] += out.new_logprobs

    for request_id, prompt in zip(ids, prompts):
        ref_tokens, ref_logits = hf_reference.generate(model_dir, prompt, MAX_NEW)
        ref = torch.log_softmax(ref_logits, dim=-1)
        got = logprobs[request_id]
        assert [lp.token_id for lp in got] == ref_tokens
        for step, lp in enumerate(got):
            assert lp.logprob == pytest.approx(ref[step, lp.token_id].item(), abs=1e-4)
            top_values, top_ids = torch.topk(ref[step], 5)
            assert [t for t, _ in lp.top] == top_ids.tolist()
            assert [v for _, v in lp.top] == pytest.approx(top_values.tolist(), abs=1e-4)
            assert lp.top[0] == (lp.token_id, pytest.approx(lp.logprob))  # greedy picks the most likely
