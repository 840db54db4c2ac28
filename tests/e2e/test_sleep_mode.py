"""Sleep mode through real processes: a router, a prefill worker and two decode workers on loopback.

Workers are put to sleep and woken over gRPC (as the planner does) and through the router's HTTP
routes (as an operator does), with requests in flight: a drain lets them finish token-exact, a
drain of zero ends them with UNAVAILABLE naming the sleep, the router routes nothing to a
sleeping worker, and a woken worker (new cache, new NIXL agent) hands KV over and decodes
token-exact again. Every test ends with no KV block held anywhere.
"""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import grpc
import pytest

from splitserve.client import Client
from splitserve.testing.cluster import Cluster, wait_until
from splitserve.v1 import worker_pb2 as worker_pb
from splitserve.v1 import worker_pb2_grpc

PROMPT = list(range(3, 60))  # 57 tokens: three full blocks go from prefill to decode


@pytest.fixture(scope="module")
def cluster(e2e_model_dir):
    cluster = Cluster(e2e_model_dir, [], ["--num-blocks", "256"])
    try:
        cluster.add_workers(("prefill", "prefill-0"), ("decode", "decode-0"), ("decode", "decode-1"))
        yield cluster
    finally:
        cluster.stop()


def worker(cluster, worker_id):
    return dict(zip(("prefill-0", "decode-0", "decode-1"), cluster.workers))[worker_id]


def stub(service):
    channel = grpc.insecure_channel(service.address)
    return (worker_pb2_grpc.PrefillWorkerStub if service.role == "prefill" else worker_pb2_grpc.DecodeWorkerStub)(channel)


def http(cluster, method, path, body=None):
    base = cluster.router.http_url.removesuffix("/v1")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def routed_to(cluster, worker_id) -> int:
    return worker(cluster, worker_id).stats().num_requests_finished


def all_free(cluster) -> bool:
    for service in cluster.workers:
        s = service.stats()
        if s.num_free_blocks != s.num_total_blocks or s.num_pinned_blocks or s.num_running or s.num_waiting:
            return False
    return True


def test_sleep_over_grpc_drains_or_ends_requests_in_flight(cluster, greedy):
    client = Client(cluster.address)
    wait_until(lambda: len(client.model_info().model) > 0, timeout=30)
    assert client.complete(PROMPT, max_tokens=4, ignore_eos=True, timeout=60).token_ids == greedy(PROMPT, 4)
    # decode-1 sleeps: everything below decodes on decode-0.
    assert stub(worker(cluster, "decode-1")).Sleep(worker_pb.SleepRequest(level=1, drain_seconds=5), timeout=60).level == 1
    decode0 = stub(worker(cluster, "decode-0"))

    # A drain long enough: the stream in flight finishes, token-exact, before the worker sleeps.
    stream = client.stream(PROMPT, max_tokens=120, ignore_eos=True, timeout=120)
    tokens = []
    while len(tokens) < 3:  # the first token comes from the prefill worker; the next ones from decode-0
        tokens += next(stream).delta.token_ids
    replies = []
    sleeper = threading.Thread(target=lambda: replies.append(decode0.Sleep(worker_pb.SleepRequest(level=2, drain_seconds=60), timeout=120)))
    sleeper.start()
    tokens += [t for r in stream for t in r.delta.token_ids]
    sleeper.join(timeout=120)
    assert tokens == greedy(PROMPT, 120)
    assert replies and replies[0].level == 2 and replies[0].num_ended == 0

    # Both decode workers asleep: a request fails at once, saying why, and nothing stalls.
    with pytest.raises(grpc.RpcError) as refused:
        client.complete(PROMPT, max_tokens=4, ignore_eos=True, timeout=30)
    assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
    with pytest.raises(grpc.RpcError) as again:
        decode0.Sleep(worker_pb.SleepRequest(level=1), timeout=30)
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # Woken (level 2: weights reloaded from the checkpoint), it takes KV from prefill again, token-exact.
    woken = decode0.Wake(worker_pb.WakeRequest(), timeout=120)
    assert woken.level == 0
    assert wait_until(lambda: _decodes(client, PROMPT, 6) == greedy(PROMPT, 6), timeout=30)

    # No drain: the request in flight is ended with UNAVAILABLE naming the sleep, not left hanging.
    stream = client.stream(PROMPT, max_tokens=400, ignore_eos=True, timeout=120)
    received = 0
    while received < 3:  # the first token comes from the prefill worker; the next ones from decode-0
        received += len(next(stream).delta.token_ids)
    reply = decode0.Sleep(worker_pb.SleepRequest(level=1, drain_seconds=0), timeout=60)
    with pytest.raises(grpc.RpcError) as ended:
        for _ in stream:
            pass
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "sleep" in ended.value.details()
    assert reply.num_ended == 1
    for name in ("decode-0", "decode-1"):
        assert stub(worker(cluster, name)).Wake(worker_pb.WakeRequest(), timeout=120).level == 0
    assert wait_until(lambda: _decodes(client, PROMPT[::-1], 5) == greedy(PROMPT[::-1], 5), timeout=30)
    assert wait_until(lambda: all_free(cluster))
    client.close()


def test_sleep_and_wake_through_the_routers_http_routes(cluster, greedy):
    client = Client(cluster.address)
    wait_until(lambda: len(client.model_info().model) > 0, timeout=30)
    status, body = http(cluster, "POST", "/sleep", {"worker_id": "decode-0", "level": 1, "drain_seconds": 5})
    assert status == 200 and body["level"] == 1 and body["worker_id"] == "decode-0"
    assert http(cluster, "GET", "/is_sleeping?worker_id=decode-0") == (200, {"worker_id": "decode-0", "role": "decode", "is_sleeping": True})
    # The router sends nothing to the sleeping worker while it sleeps.
    assert wait_until(lambda: _decodes(client, PROMPT, 3) == greedy(PROMPT, 3), timeout=30)
    before = routed_to(cluster, "decode-0")
    for i in range(4):
        prompt = PROMPT[i:]
        assert client.complete(prompt, max_tokens=3, ignore_eos=True, timeout=60).token_ids == greedy(prompt, 3)
    assert routed_to(cluster, "decode-0") == before

    # The prefill worker sleeps too (its leases let go); decode workers then prefill themselves.
    status, body = http(cluster, "POST", "/sleep", {"worker_id": "prefill-0", "level": 2, "drain_seconds": 1})
    assert status == 200 and body["level"] == 2
    computed = worker(cluster, "prefill-0").stats().num_prompt_tokens_computed
    assert wait_until(lambda: _decodes(client, PROMPT[5:], 3) == greedy(PROMPT[5:], 3), timeout=30)
    assert worker(cluster, "prefill-0").stats().num_prompt_tokens_computed == computed

    # Bad requests name the field; unknown workers and waking an awake one are told apart.
    status, body = http(cluster, "POST", "/sleep", {"worker_id": "decode-1", "level": 3})
    assert status == 400 and body["error"]["param"] == "level"
    status, body = http(cluster, "POST", "/sleep", {"worker_id": "decode-9"})
    assert status == 404 and body["error"]["param"] == "worker_id"
    status, body = http(cluster, "POST", "/wake_up", {"worker_id": "decode-1"})
    assert status == 409 and "awake" in body["error"]["message"]

    for name in ("prefill-0", "decode-0"):
        status, body = http(cluster, "POST", "/wake_up", {"worker_id": name})
        assert status == 200 and body["level"] == 0
    assert http(cluster, "GET", "/is_sleeping?worker_id=decode-0")[1]["is_sleeping"] is False
    # Both woke with new NIXL agents: prefill hands KV to decode again (handshaken afresh), token-exact.
    transfers = sum(worker(cluster, n).stats().num_kv_transfers for n in ("decode-0", "decode-1"))
    long_prompt = list(range(100, 180))
    assert wait_until(lambda: _decodes(client, long_prompt, 4) == greedy(long_prompt, 4), timeout=30)
    assert sum(worker(cluster, n).stats().num_kv_transfers for n in ("decode-0", "decode-1")) > transfers
    assert wait_until(lambda: all_free(cluster))
    client.close()


def _decodes(client, prompt, max_tokens):
    try:
        return client.complete(prompt, max_tokens=max_tokens, ignore_eos=True, timeout=30).token_ids
    except grpc.RpcError:
        return None


class _Deployment:
    """The Deployment's scale subresource as the planner sees it (no Kubernetes here): it counts."""

    def __init__(self, replicas: int) -> None:
        self.replicas = replicas

    def get_scale(self):
        from splitserve.planner.kube import Scale

        return Scale(self.replicas, "app=decode")

    def set_replicas(self, replicas: int) -> None:
        self.replicas = replicas


def test_the_planner_sleeps_and_wakes_workers_before_touching_pods(cluster, greedy):
    from splitserve.planner.sleep import RouterSleepAPI, SleepFirstScaler

    router = RouterSleepAPI(cluster.router.http_url.removesuffix("/v1"))
    deployment = _Deployment(2)
    scaler = SleepFirstScaler(deployment, router, "decode", level=1, drain_seconds=5, max_sleeping=1)
    assert scaler.get_scale().replicas == 2
    scaler.set_replicas(1)  # one decode worker sleeps; no pod goes
    assert deployment.replicas == 2 and scaler.get_scale().replicas == 1
    assert sum(w.is_sleeping for w in router.workers("decode")) == 1
    scaler.set_replicas(0)  # past max_sleeping: the Deployment shrinks instead
    assert deployment.replicas == 1 and sum(w.is_sleeping for w in router.workers("decode")) == 1
    deployment.replicas = 2
    scaler.set_replicas(3)  # the sleeper wakes first; one pod more for the rest
    assert deployment.replicas == 3 and not any(w.is_sleeping for w in router.workers("decode"))
    client = Client(cluster.address)
    assert wait_until(lambda: _decodes(client, PROMPT, 3) == greedy(PROMPT, 3), timeout=30)
    client.close()
