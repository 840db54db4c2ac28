"""The GPU fast path computes what transformers computes: Triton kernels, fused norms and rotary, decode CUDA graphs.

fp32: greedy tokens equal transformers' on the CPU, token for token, through whole
prompts and chunked prefill, for all four architectures. bf16: every step's logits,
teacher-forced along transformers' fp32 tokens, stay within a relative error bound.
Batches of 1, 3 and 5 requests exercise graph buckets with and without padding rows.
"""
from __future__ import annotations

import random

import pytest
import torch

from splitserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from splitserve.engine.warmup import warm_up

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
MAX_NEW = 10
BLOCK_SIZE = 16


def prompts_for(arch: str, lengths=(3, 17, 37, 70, 90)) -> list[list[int]]:
    rng = random.Random(arch)
    return [[rng.randrange(3, 1000) for _ in range(n)] for n in lengths]


def gpu_engine(model_dir, dtype, max_num_batched_tokens=2048, async_scheduling=None) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=ModelConfig(model_dir, dtype=dtype, device="cuda"),
            cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=128),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, async_scheduling=async_scheduling),
        )
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("max_num_batched_tokens", [2048, 7], ids=["whole-prompts", "chunked-prefill"])
@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_fp32_greedy_matches_transformers(arch, max_num_batched_tokens, async_scheduling, tiny_checkpoint, run_engine, hf_reference):
    model_dir = tiny_checkpoint(arch)
    engine = gpu_engine(model_dir, torch.float32, max_num_batched_tokens, async_scheduling)
    assert engine.async_scheduling == async_scheduling
    prompts = prompts_for(arch)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    tokens = run_engine(engine)
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == hf_reference.tokens(model_dir, prompt, MAX_NEW), (arch, len(prompt))
    assert engine.runner.backend.name == "triton"
    assert engine.runner.graphs.num_replays >= MAX_NEW - 2  # the decode steps ran as graphs


def teacher_forced_logits(runner: ModelRunner, prompts: list[list[int]], forced: list[list[int]]) -> list[torch.Tensor]:
    """Per request, logits [len(forced), vocab]: after its prompt, then after each forced token but the last."""
    blocks_per_request = -(-(max(map(len, prompts)) + MAX_NEW) // BLOCK_SIZE)
    tables = [list(range(i * blocks_per_request, (i + 1) * blocks_per_request)) for i in range(len(prompts))]
    rows = []
    out = SchedulerOutput([ScheduledRequest(f"r{i}", p, 0, tables[i], True) for i, p in enumerate(prompts)])
    rows.append(runner.execute(out).float().cpu())
    for j in range(len(forced[0]) - 1):
        out = SchedulerOutput(
            [ScheduledRequest(f"r{i}", [forced[i][j]], len(p) + j, tables[i], True) for i, p in enumerate(prompts)]
        )
        assert runner.graphs.can_run(out)
        rows.append(runner.execute(out).float().cpu())
    return [torch.stack([r[i] for r in rows]) for i in range(len(prompts))]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_decode_graph_logits_match_transformers(arch, dtype, batch, tiny_checkpoint, hf_reference):
    model_dir = tiny_checkpoint(arch)
    runner = ModelRunner(ModelConfig(model_dir, dtype=dtype, device="cuda"), CacheConfig(block_size=BLOCK_SIZE, num_blocks=64))
    prompts = prompts_for(arch)[:batch]
    references = [hf_reference.generate(model_dir, p, MAX_NEW) for p in prompts]
    got = teacher_forced_logits(runner, prompts, [tokens for tokens, _ in references])
    assert runner.graphs.num_replays == MAX_NEW - 1
    bound = 1e-4 if dtype == torch.float32 else 5e-2
    for logits, (tokens, ref) in zip(got, references):
        assert not logits.isnan().any()
        err = ((logits - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
        assert err < bound, (arch, err)
        if dtype == torch.float32:
            assert logits.argmax(-1).tolist() == tokens


def test_graph_and_eager_decode_agree(tiny_checkpoint):
    """The same decode step, replayed from a padded bucket and run eagerly, gives the same logits."""
    model_dir = tiny_checkpoint("llama")
    runner = ModelRunner(ModelConfig(model_dir, dtype=torch.float32, device="cuda"), CacheConfig(block_size=BLOCK_SIZE, num_blocks=64))
    prompts = prompts_for("llama")[:5]
    tables = [[2 * i + 1, 2 * i + 20] for i in range(5)]
    runner.execute(SchedulerOutput([ScheduledRequest(f"r{i}", p[:16], 0, tables[i], True) for i, p in enumerate(prompts) if len(p) >= 16]))
    decode = SchedulerOutput([ScheduledRequest(f"r{i}", [7 + i], 16, tables[i], True) for i in range(1, 4)])
    kv_before = runner.kv_cache.clone()
    graph_logits = runner.execute(decode)  # 3 requests: bucket 4, one padding row
    assert runner.graphs.num_replays == 1
    kv_graph = runner.kv_cache.clone()
    runner.kv_cache.copy_(kv_before)
    graphs, runner.graphs = runner.graphs, None
    eager_logits = runner.execute(decode)
    runner.graphs = graphs
    torch.testing.assert_close(graph_logits, eager_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv_graph, runner.kv_cache, rtol=1e-5, atol=1e-5)  # the padding row wrote nothing


def test_warm_up_captures_every_bucket_and_changes_no_output(llama_tiny_dir, hf_reference):
    engine = gpu_engine(llama_tiny_dir, torch.float32)
    warm_up(engine.runner, max_num_seqs=64)
    graphs = engine.runner.graphs
    assert set(graphs._graphs) == {b for b in graphs.buckets if b <= 64}
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks
    prompt = prompts_for("llama")[2]
    engine.add_request("r", prompt, SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True))
    tokens = []
    while engine.has_unfinished:
        tokens += [t for out in engine.step().outputs for t in out.new_token_ids]
    assert tokens == hf_reference.tokens(llama_tiny_dir, prompt, MAX_NEW)
