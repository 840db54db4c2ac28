"""The planner's I/O against loopback servers: the real ``kubernetes`` client talking to a
small fake of the API server's scale and pod endpoints, and real prometheus_client /metrics
servers standing in for the workers. (The same loop against a real cluster is in
test_planner_cluster.py.)"""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import MetricsHandler

from splitserve.planner import Planner, PoolPolicy, Target, run_planner
from splitserve.planner.kube import DeploymentScaler
from splitserve.planner.loop import PlannerTelemetry, PoolHandle, run_once
from splitserve.planner.sources import PodScrapeSource

NS = "llm"


class FakeApiServer:
    """Deployments' scale subresource and pod lists, as the Kubernetes API serves them."""

    def __init__(self):
        self.replicas = {"prefill": 1, "decode": 1}
        self.pods: dict[str, list[dict]] = {"prefill": [], "decode": []}
        self.patches: list[tuple[str, dict]] = []
        self.fail_patch = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                url = urlparse(self.path)
                if m := re.fullmatch(rf"/apis/apps/v1/namespaces/{NS}/deployments/(\w+)/scale", url.path):
                    return self._send(200, fake.scale(m.group(1)))
                if url.path == f"/api/v1/namespaces/{NS}/pods":
                    selector = parse_qs(url.query)["labelSelector"][0]
                    pool = selector.split("=")[1]
                    return self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": fake.pods[pool]})
                self._send(404, {"kind": "Status", "code": 404})

            def do_PATCH(self):
                m = re.fullmatch(rf"/apis/apps/v1/namespaces/{NS}/deployments/(\w+)/scale", self.path)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not m or fake.fail_patch:
                    return self._send(500, {"kind": "Status", "code": 500, "message": "etcd is sad"})
                fake.patches.append((m.group(1), body))
                fake.replicas[m.group(1)] = body["spec"]["replicas"]
                self._send(200, fake.scale(m.group(1)))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def scale(self, name):
        return {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": name, "namespace": NS},
                "spec": {"replicas": self.replicas[name]},
                "status": {"replicas": self.replicas[name], "selector": f"pool={name}"}}

    def add_pod(self, pool, name, metrics_port, ready=True):
        self.pods[pool].append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "labels": {"pool": pool}},
            "spec": {"containers": [{"name": pool, "image": "splitserve",
                                     "ports": [{"name": "grpc", "containerPort": 1},
                                               {"name": "metrics", "containerPort": metrics_port}]}]},
            "status": {"phase": "Running", "podIP": "127.0.0.1",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
        })


def worker_metrics(waiting=0.0, used=10.0, free=90.0):
    """A real /metrics endpoint on loopback, like a worker's; returns (gauges, port)."""
    registry = CollectorRegistry()
    gauges = {
        "waiting": Gauge("splitserve_waiting_requests", "", ["role"], registry=registry).labels("x"),
        "used": Gauge("splitserve_kv_blocks_used", "", registry=registry),
        "free": Gauge("splitserve_kv_blocks_free", "", registry=registry),
    }
    gauges["waiting"].set(waiting)
    gauges["used"].set(used)
    gauges["free"].set(free)
    server = ThreadingHTTPServer(("127.0.0.1", 0), MetricsHandler.factory(registry))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return gauges, server


@pytest.fixture
def api():
    fake = FakeApiServer()
    yield fake
    fake.server.shutdown()


@pytest.fixture
def servers():
    started = []

    def start(**kw):
        gauges, server = worker_metrics(**kw)
        started.append(server)
        return gauges, server.server_address[1]

    yield start
    for s in started:
        s.shutdown()


FAST = dict(scale_up_stabilization_s=0, scale_down_stabilization_s=0, scale_up_cooldown_s=0, scale_down_cooldown_s=0, smoothing=1.0)
POLICIES = {"prefill": PoolPolicy(targets=(Target("waiting_per_replica", high=4, low=0.5),), **FAST),
            "decode": PoolPolicy(targets=(Target("kv_cache_utilization", high=0.85, low=0.4),), **FAST)}


def make_pools(api):
    api_client = client.ApiClient(client.Configuration(host=api.url))
    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    pools = []
    for pool in ("prefill", "decode"):
        scaler = DeploymentScaler(apps, core, NS, pool)
        pools.append(PoolHandle(pool, scaler, PodScrapeSource(scaler.list_metrics_targets, timeout_s=2)))
    return pools


def test_scales_each_deployment_through_the_scale_subresource(api, servers):
    _, p1 = servers(waiting=10)
    _, d1 = servers(used=50, free=50)
    api.add_pod("prefill", "prefill-a", p1)
    api.add_pod("decode", "decode-a", d1)
    telemetry = PlannerTelemetry()
    decisions = run_once(Planner(POLICIES), make_pools(api), telemetry=telemetry)
    assert [(d.pool, d.desired_replicas) for d in decisions] == [("prefill", 2), ("decode", 1)]
    assert api.patches == [("prefill", {"spec": {"replicas": 2}})]
    assert telemetry.registry.get_sample_value("splitserve_planner_scalings_total", {"pool": "prefill", "direction": "up"}) == 1


def test_only_ready_pods_that_answer_are_counted(api, servers):
    gauges, p1 = servers(waiting=3)
    _, p2 = servers(waiting=100)
    api.replicas["prefill"] = 3
    api.add_pod("prefill", "prefill-a", p1)
    api.add_pod("prefill", "prefill-loading", p2, ready=False)  # not ready: not scraped
    api.add_pod("prefill", "prefill-gone", 1)  # nothing listens there
    scaler = make_pools(api)[0].scaler
    sample = PodScrapeSource(scaler.list_metrics_targets, timeout_s=2).collect()
    assert sample.num_ready_replicas == 1 and sample.num_waiting_requests == 3


def test_dry_run_and_api_errors_change_nothing(api, servers):
    _, p1 = servers(waiting=50)
    api.add_pod("prefill", "prefill-a", p1)
    pools = make_pools(api)
    assert run_once(Planner(POLICIES), pools, dry_run=True)[0].desired_replicas == 2
    assert api.patches == []
    api.fail_patch = True
    telemetry = PlannerTelemetry()
    run_once(Planner(POLICIES), pools, telemetry=telemetry)  # logged, not raised
    assert api.replicas["prefill"] == 1
    assert telemetry.registry.get_sample_value("splitserve_planner_errors_total", {"pool": "prefill"}) == 1


def test_no_pods_means_no_change(api):
    api.replicas["decode"] = 3
    decisions = run_once(Planner(POLICIES), make_pools(api))
    assert all(not d.changed and d.reason == "no metrics" for d in decisions)
    assert api.patches == []


def test_cli_runs_one_round_from_a_kubeconfig(api, servers, tmp_path, capsys):
    _, d1 = servers(used=95, free=5)
    api.add_pod("decode", "decode-a", d1)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
    }))
    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps({"decode": {"minReplicas": 1, "maxReplicas": 2, "scaleUpStabilizationSeconds": 0,
                                             "targets": {"kvCacheUtilization": {"high": 0.9, "low": 0.3}}}}))
    rc = run_planner(["--namespace", NS, "--prefill-deployment", "prefill", "--decode-deployment", "decode",
                      "--kubeconfig", str(kubeconfig), "--policy", str(policy), "--once"])
    assert rc == 0
    assert api.patches == [("decode", {"spec": {"replicas": 2}})]
    out = capsys.readouterr().out
    assert "prefill: 1 -> 1 (no metrics)" in out and "decode: 1 -> 2" in out


def test_cli_rejects_a_bad_policy(tmp_path, capsys):
    policy = tmp_path / "policy.yaml"
    policy.write_text("decode:\n  targets:\n    kvCacheUtilization: {high: 0.3, low: 0.9}\n")
    with pytest.raises(SystemExit):
        run_planner(["--namespace", NS, "--prefill-deployment", "p", "--decode-deployment", "d", "--policy", str(policy)])
    assert "decode: targets.kv_cache_utilization: low (0.9) must be below high (0.3)" in capsys.readouterr().err
