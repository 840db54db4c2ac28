"""Speculative decoding in a TP group (two CPU ranks over gloo): the step message carries each
request's number of proposed tokens, every rank computes their rows, and the draft runs
unsharded beside rank 0. Greedy output equals a single process without speculation."""
from __future__ import annotations

import random

import pytest
import torch

from splitserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.parallel.runner import make_runner


def generate(model_dir, tp: int, spec: SpeculativeConfig):
    config = EngineConfig(
        model=ModelConfig(model_dir, dtype=torch.float32), cache=CacheConfig(block_size=4, num_blocks=128),
        scheduler=SchedulerConfig(async_scheduling=False), parallel=ParallelConfig(tp), speculative=spec,
    )
    runner = make_runner(config)
    try:
        engine = LLMEngine(config, runner)
        rng = random.Random(0)
        for i in range(3):
            phrase = [rng.randrange(1, 1000) for _ in range(7)]
            engine.add_request(f"r{i}", phrase * 3, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished:
            for out in engine.step().outputs:
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        return tokens, engine.stats().spec
    finally:
        if tp > 1:
            runner.close()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_tp2_speculative_greedy_equals_single_process(method, llama_tiny_dir):
    plain, _ = generate(llama_tiny_dir, 1, SpeculativeConfig())
    spec = SpeculativeConfig(method, 3, llama_tiny_dir if method == "draft" else None)
    tokens, stats = generate(llama_tiny_dir, 2, spec)
    assert tokens == plain
    assert stats.num_accepted_tokens > 0
