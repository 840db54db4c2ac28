"""Fixtures for end-to-end tests: real processes on loopback (see splitserve.testing.cluster)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

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
