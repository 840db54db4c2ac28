"""Prefix-aware routing over a shared Redis control plane, with real routers, workers and redis-server.

The tests run in file order on one deployment: the last ones kill a worker, then Redis.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
import pytest

from splitserve.client import Client
from splitserve.controlplane import RedisControlPlane
from splitserve.controlplane.testing import require_redis_server, start_redis_server
from splitserve.engine.prefix_hash import hash_request_tokens
from splitserve.services.router.routing import rendezvous_rank
from splitserve.testing.cluster import Cluster, Service, wait_until
from splitserve.v1 import worker_pb2 as worker_pb
from splitserve.v1 import worker_pb2_grpc

BLOCK = 16


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    require_redis_server()
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def deployment(redis, e2e_model_dir):
    # A 3-second registration TTL: the dead-worker test waits for a lapse.
    cluster = Cluster(e2e_model_dir, control_plane=redis.url, worker_args=["--num-blocks", "512", "--registration-ttl", "3"])
    cluster.add_workers(("prefill", "prefill-a"), ("prefill", "prefill-b"), ("decode", "decode-0"))
    round_robin = Service(
        "router", ["--model", str(e2e_model_dir), "--port", "0", "--http-port", "0", "--metrics-port", "-1", "--control-plane", redis.url, "--policy", "round_robin"], cluster.env
    )
    round_robin.wait_ready()
    yield cluster, round_robin
    round_robin.stop()
    cluster.stop()


def _prefills(cluster: Cluster):
    return {_worker_id(w): w for w in cluster.workers if w.role == "prefill"}


def _worker_id(service: Service) -> str:
    args = service.proc.args
    return args[args.index("--worker-id") + 1]


def _computed(cluster: Cluster) -> int:
    return sum(w.stats().num_prompt_tokens_computed for w in cluster.workers if w.role == "prefill")


def _traffic(base: int) -> list[list[int]]:
    """4 long shared prefixes (8 blocks each) x 6 distinct suffixes."""
    prompts = []
    for p in range(4):
        prefix = [base + p] + [(base + 7 * p + i) % 900 + 3 for i in range(127)]
        prompts += [prefix + [900 + s] * 16 for s in range(6)]
    return prompts


def _run(address: str, prompts: list[list[int]]) -> None:
    client = Client(address)
    for prompt in prompts:  # one at a time: each request's KV events land before the next is routed
        assert client.complete(prompt, max_tokens=2, ignore_eos=True, timeout=60).completion_tokens == 2


def test_prefix_aware_routing_computes_far_fewer_prefill_tokens_than_round_robin(deployment):
    cluster, round_robin = deployment
    before = _computed(cluster)
    _run(cluster.address, _traffic(base=10))
    prefix_aware = _computed(cluster) - before
    before = _computed(cluster)
    _run(round_robin.address, _traffic(base=400))  # other prefixes: no help from the first run's cache
    rr = _computed(cluster) - before
    # Prefix-aware computes each prefix once; round robin once per worker.
    assert prefix_aware < 0.8 * rr, (prefix_aware, rr)


def _prime(worker: Service, prompt: list[int], request_id: str) -> None:
    """Puts the prompt's blocks in one worker's prefix cache through its internal API."""
    with grpc.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.PrefillWorkerStub(channel)
        engine_request = worker_pb.EngineRequest(request_id=request_id, prompt_token_ids=prompt, max_tokens=2, ignore_eos=True)
        stub.Prefill(worker_pb.PrefillRequest(request=engine_request), timeout=30)
        stub.ReleaseKV(worker_pb.LeaseRequest(request_id=request_id), timeout=30)


def _prompt_held_by_the_tie_loser(prefills: dict[str, Service], tag: int) -> tuple[list[int], str]:
    """A prompt whose equal-cost tie-break would pick one worker, primed on the other:
    only a router that sees the block index sends it to the holder."""
    prompt = [tag] + [(tag * 13 + i) % 800 + 3 for i in range(95)]
    first_block = hash_request_tokens(prompt, BLOCK)[0]
    loser = min(prefills, key=lambda worker_id: rendezvous_rank(first_block, worker_id))
    _prime(prefills[loser], prompt, f"prime-{tag}")
    return prompt, loser


def _routed_to(prefills: dict[str, Service], address: str, prompt: list[int]) -> tuple[str, int]:
    before = {w: s.stats().num_requests_finished for w, s in prefills.items()}
    result = Client(address).complete(prompt, max_tokens=2, ignore_eos=True, timeout=60)
    after = {w: s.stats().num_requests_finished for w, s in prefills.items()}
    (chosen,) = [w for w in prefills if after[w] > before[w]]
    return chosen, result.cached_prompt_tokens


def test_two_router_replicas_make_the_same_choice(deployment, e2e_model_dir, redis):
    cluster, _ = deployment
    prefills = _prefills(cluster)
    replica = Service("router", ["--model", str(e2e_model_dir), "--port", "0", "--http-port", "0", "--metrics-port", "-1", "--control-plane", redis.url], cluster.env)
    replica.wait_ready()
    try:
        for tag in (101, 102, 103):
            prompt, holder = _prompt_held_by_the_tie_loser(prefills, tag)
            time.sleep(0.5)  # let the worker publish its KV events
            first, _ = _routed_to(prefills, cluster.address, prompt + [5])
            second, cached = _routed_to(prefills, replica.address, prompt + [6])
            assert first == second == holder
            assert cached >= 80
    finally:
        replica.stop()


def test_restarted_router_recovers_the_index_from_redis(deployment, e2e_model_dir, redis):
    cluster, _ = deployment
    prefills = _prefills(cluster)
    prompt, holder = _prompt_held_by_the_tie_loser(prefills, 201)
    cluster.router.kill()
    cluster.router = Service("router", ["--model", str(e2e_model_dir), "--port", "0", "--http-port", "0", "--metrics-port", "-1", "--control-plane", redis.url], cluster.env)
    cluster.address = cluster.router.wait_ready()
    chosen, cached = _routed_to(prefills, cluster.address, prompt + [7])
    assert chosen == holder and cached >= 80


def test_dead_worker_is_dropped_after_its_ttl_and_requests_keep_succeeding(deployment, redis):
    cluster, _ = deployment
    prefills = _prefills(cluster)
    victim = prefills.pop("prefill-b")
    victim.kill()
    _run(cluster.address, _traffic(base=600)[:6])

    async def live_prefill_ids():
        store = await RedisControlPlane.connect(redis.url)
        try:
            return {w.info.worker_id for w in await store.live_workers("prefill")}
        finally:
            await store.close()

    assert wait_until(lambda: asyncio.run(live_prefill_ids()) == {"prefill-a"}, timeout=15)
    _run(cluster.address, _traffic(base=700)[:6])


def test_redis_lost_mid_run_degrades_to_load_only_routing(deployment, redis):
    cluster, _ = deployment
    redis.kill()
    _run(cluster.address, _traffic(base=800)[:4])
    assert wait_until(lambda: "load" in cluster.router.output().lower() and "unavailable" in cluster.router.output().lower(), timeout=5)


def test_redis_unavailable_at_start_is_a_clear_error(e2e_model_dir):
    url = "redis://127.0.0.1:1/0"
    result = subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "router", "--model", str(e2e_model_dir), "--port", "0", "--http-port", "0", "--metrics-port", "-1", "--control-plane", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "127.0.0.1:1" in result.stderr and "Traceback" not in result.stderr
