"""Fixtures for end-to-end tests: real processes on loopback (see splitserve.testing.cluster)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from splitserve.testing.cluster import Cluster


@pytest.fixture(scope="session")
def e2e_model_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture
def start_cluster(e2e_model_dir) -> Callable[..., Cluster]:
    """A factory for clusters torn down after the test (for tests that kill processes)."""
    clusters: list[Cluster] = []

    def start(router_args=(), worker_args=()) -> Cluster:
        cluster = Cluster(e2e_model_dir, list(router_args), list(worker_args))
        clusters.append(cluster)
        return cluster

    yield start
    for cluster in clusters:
        cluster.stop()


@pytest.fixture(scope="session")
def greedy(e2e_model_dir) -> Callable[[list[int], int], list[int]]:
    """transformers' greedy continuation on the e2e checkpoint, in fp32: the reference for token-exact checks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(e2e_model_dir, dtype=torch.float32).eval()

    def run(prompt: list[int], max_tokens: int) -> list[int]:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt) :].tolist()

    return run
