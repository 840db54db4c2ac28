"""The planner against a real cluster, when KUBECONFIG points at one.

Creates a throwaway namespace with two small Deployments standing in for the pools, then
runs planner rounds with the real scaler: one with the pods' own (absent) metrics, which must
change nothing, and one fed a loaded sample, which must patch each Deployment's scale.
"""
from __future__ import annotations

import os
import time
import uuid

import pytest

from splitserve.planner import Planner, PoolPolicy, PoolSample, Target
from splitserve.planner.kube import DeploymentScaler
from splitserve.planner.loop import PoolHandle, run_once
from splitserve.planner.sources import PodScrapeSource


@pytest.fixture(scope="module")
def kube():
    if not os.environ.get("KUBECONFIG"):
        pytest.skip("no cluster: KUBECONFIG unset")
    from kubernetes import client, config

    try:
        config.load_kube_config()
        client.VersionApi().get_code(_request_timeout=5)
    except Exception as e:  # unreadable kubeconfig or unreachable API server
        pytest.skip(f"no cluster: {type(e).__name__}: {e}")
    core, apps = client.CoreV1Api(), client.AppsV1Api()
    ns = f"splitserve-planner-it-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": ns}})
    try:
        for pool in ("prefill", "decode"):
            labels = {"app.kubernetes.io/component": pool, "splitserve-it": ns}
            apps.create_namespaced_deployment(ns, {
                "metadata": {"name": pool},
                "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": pool, "image": "registry.k8s.io/pause:3.9",
                                             "ports": [{"name": "metrics", "containerPort": 9091}],
                                             "resources": {"requests": {"cpu": "1m", "memory": "8Mi"}}}]}}},
            })
        yield core, apps, ns
    finally:
        core.delete_namespace(ns)


FAST = dict(scale_up_stabilization_s=0, scale_up_cooldown_s=0, smoothing=1.0, max_replicas=2)
POLICIES = {"prefill": PoolPolicy(targets=(Target("waiting_per_replica", high=4, low=0.5),), **FAST),
            "decode": PoolPolicy(targets=(Target("kv_cache_utilization", high=0.85, low=0.4),), **FAST)}


class LoadedPool:
    def collect(self) -> PoolSample:
        return PoolSample(time.monotonic(), 1, num_waiting_requests=50, num_running_requests=8,
                          kv_cache_utilization=0.97, ttft_p90_seconds=None, itl_p90_seconds=None)


def test_planner_against_a_real_cluster(kube):
    core, apps, ns = kube
    scalers = {pool: DeploymentScaler(apps, core, ns, pool) for pool in ("prefill", "decode")}
    assert scalers["prefill"].get_scale().selector  # the scale subresource reports the pods' selector

    # The pause containers serve no metrics: the planner must hold both pools.
    real = [PoolHandle(p, s, PodScrapeSource(s.list_metrics_targets, timeout_s=2)) for p, s in scalers.items()]
    decisions = run_once(Planner(POLICIES), real)
    assert [d.changed for d in decisions] == [False, False]
    assert all(s.get_scale().replicas == 1 for s in scalers.values())

    # Loaded samples: each Deployment is scaled to 2 through its scale subresource.
    loaded = [PoolHandle(p, s, LoadedPool()) for p, s in scalers.items()]
    planner = Planner(POLICIES)
    run_once(planner, loaded)
    assert {p: s.get_scale().replicas for p, s in scalers.items()} == {"prefill": 2, "decode": 2}
    run_once(planner, loaded)  # at maxReplicas: no further step
    assert {p: apps.read_namespaced_deployment(p, ns).spec.replicas for p in scalers} == {"prefill": 2, "decode": 2}
