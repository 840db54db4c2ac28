"""A router and workers held under attack and overload, on real processes over plaintext gRPC.

One cluster for the module: clients hold API keys, the workers a worker key of their own. What
is checked is what a client (or anyone who reaches a port) can do: nothing on the control plane
or the workers with a client key, no large or looping input that stalls the router for others,
no traceback for bytes that do not parse, only RESOURCE_EXHAUSTED past --max-inflight, and no
second router on a port that is taken. TLS on top of this: test_tls_auth.py.
"""
from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitserve.client import AsyncClient, Client
from splitserve.testing.cluster import Cluster
from splitserve.v1 import controlplane_pb2 as cp_pb
from splitserve.v1 import controlplane_pb2_grpc as cp_grpc
from splitserve.v1 import generation_pb2 as gen_pb
from splitserve.v1 import worker_pb2 as worker_pb
from splitserve.v1 import worker_pb2_grpc

pytestmark = [pytest.mark.slow]

CLIENT_KEY, WORKER_KEY = "sk-client-3a91", "wk-worker-c07d"
MAX_INFLIGHT = 6
PROMPT = "A prompt of a few blocks, so that the prefill worker hands its KV to the decode worker. " * 2


def _auth(key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


@pytest.fixture(scope="module")
def cluster(e2e_model_dir, tmp_path_factory) -> Iterator[Cluster]:
    d = tmp_path_factory.mktemp("keys")
    (d / "clients").write_text(f"{CLIENT_KEY}\n")
    (d / "workers").write_text(f"{WORKER_KEY}\n")
    cluster = Cluster(
        e2e_model_dir,
        ["--api-keys-file", str(d / "clients"), "--worker-keys-file", str(d / "workers"), "--max-inflight", str(MAX_INFLIGHT)],
        ["--worker-keys-file", str(d / "workers"), "--num-blocks", "256"],
    )
    try:
        cluster.add_workers(("prefill", "prefill-h"), ("decode", "decode-h"))
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def client(cluster) -> Iterator[Client]:
    c = Client(cluster.address, api_key=CLIENT_KEY)
    yield c
    c.close()


def _timed_completion(client: Client) -> float:
    start = time.monotonic()
    result = client.complete(PROMPT, max_tokens=4, ignore_eos=True, timeout=120)
    assert result.completion_tokens == 4
    return time.monotonic() - start


def _usual_time(client: Client) -> float:
    return max(_timed_completion(client) for _ in range(3))


def _served_meanwhile(client: Client, attack) -> tuple[float, object]:
    """Runs ``attack`` on a thread and, once it is under way, times a normal request."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = attack()
        except Exception as e:  # noqa: BLE001 -- reported by the test
            out["result"] = e

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.3)
    took = _timed_completion(client)
    thread.join(timeout=120)
    assert not thread.is_alive(), "the attack never finished"
    return took, out["result"]


# -- separate identities ------------------------------------------------------------------


def test_the_sleep_routes_take_the_worker_key_never_a_client_key(cluster):
    """Sleep and wake decide which workers serve: a client's API key must not reach them."""
    root = cluster.router.http_url.removesuffix("/v1")
    for key in (None, CLIENT_KEY):
        for method, path, body in (("POST", "/sleep", {"worker_id": "decode-h"}), ("POST", "/wake_up", {"worker_id": "decode-h"}),
                                   ("GET", "/is_sleeping", None)):
            r = httpx.request(method, f"{root}{path}", json=body, headers=dict(_auth(key)), timeout=30)
            assert r.status_code == 401, (path, key, r.text)
    r = httpx.get(f"{root}/is_sleeping", headers=dict(_auth(WORKER_KEY)), timeout=30)
    assert r.status_code == 200 and {w["worker_id"]: w["is_sleeping"] for w in r.json()["workers"]} == {"prefill-h": False, "decode-h": False}
    # The client key still serves requests, and no worker was put to sleep by the refused calls.
    assert httpx.get(f"{root}/v1/models", headers=dict(_auth(CLIENT_KEY)), timeout=30).status_code == 200


def test_a_client_key_opens_neither_the_control_plane_nor_the_workers(cluster):
    info = cp_pb.WorkerInfo(worker_id="fake-prefill", role="prefill", address="127.0.0.1:1", block_size=16, tp_size=1)
    calls = {
        "Register": cp_pb.RegisterRequest(info=info, ttl_seconds=30),
        "Deregister": cp_pb.DeregisterRequest(worker_id="decode-h"),
        "LiveWorkers": cp_pb.LiveWorkersRequest(),
        "Heartbeat": cp_pb.HeartbeatRequest(worker_id="decode-h"),
    }
    with grpc.insecure_channel(cluster.address) as channel:
        stub = cp_grpc.ControlPlaneStub(channel)
        for name, request in calls.items():
            for key in (None, CLIENT_KEY):
                with pytest.raises(grpc.RpcError) as e:
                    getattr(stub, name)(request, metadata=_auth(key), timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        # The workers' own key does open it; the fake worker never got in, the real ones are all there.
        live = stub.LiveWorkers(cp_pb.LiveWorkersRequest(), metadata=_auth(WORKER_KEY), timeout=10)
        assert sorted(w.info.worker_id for w in live.workers) == ["decode-h", "prefill-h"]
    for worker in cluster.workers:
        with grpc.insecure_channel(worker.address) as channel:
            stub = (worker_pb2_grpc.PrefillWorkerStub if worker.role == "prefill" else worker_pb2_grpc.DecodeWorkerStub)(channel)
            for key in (None, CLIENT_KEY):
                with pytest.raises(grpc.RpcError) as e:
                    stub.GetTransferMetadata(worker_pb.TransferMetadataRequest(), metadata=_auth(key), timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert stub.GetStats(worker_pb.StatsRequest(), metadata=_auth(WORKER_KEY), timeout=10).worker_id in ("prefill-h", "decode-h")
    # and the worker key is no client key
    with pytest.raises(grpc.RpcError) as e:
        Client(cluster.address, api_key=WORKER_KEY).model_info()
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_decode_worker_dials_only_listed_prefill_workers(cluster, client):
    """A KV handle naming an address the registry does not list is not dialed: the prompt is prefilled locally."""
    decode = next(w for w in cluster.workers if w.role == "decode")
    trap = socket.create_server(("127.0.0.1", 0))
    trap.settimeout(0.5)
    port = trap.getsockname()[1]
    prompt = list(range(10, 60))
    request = worker_pb.DecodeRequest(
        request=worker_pb.EngineRequest(request_id="forged-handle", prompt_token_ids=prompt, max_tokens=3, ignore_eos=True),
        kv=worker_pb.KVHandle(worker_id="prefill-h", address=f"127.0.0.1:{port}", agent_name="forged", block_ids=[0, 1, 2], num_tokens=48),
    )
    finished = threading.Event()

    def commands():
        yield worker_pb.DecodeCommand(start=request)
        finished.wait(60)

    tokens, error = [], None
    with grpc.insecure_channel(decode.address) as channel:
        stream = worker_pb2_grpc.DecodeWorkerStub(channel).Decode(commands(), metadata=_auth(WORKER_KEY), timeout=120)
        for message in stream:
            for update in message.updates:
                tokens += [t.token_id for t in update.tokens]
                error = update.error_message or error
                if update.finish_reason or update.error_code:
                    finished.set()
            if finished.is_set():
                stream.cancel()
                break
    assert error is None and len(tokens) == 3
    with pytest.raises(TimeoutError):
        trap.accept()  # nobody ever connected to the address the handle named
    trap.close()


# -- bounded input ------------------------------------------------------------------------


def test_a_50_mb_body_gets_413_at_once_and_others_are_served_meanwhile(cluster, client):
    usual = _usual_time(client)
    url = f"{cluster.router.http_url}/completions"
    body = json.dumps({"prompt": "x" * (50 << 20), "max_tokens": 1}).encode()

    def attack():
        start = time.monotonic()
        r = httpx.post(url, content=body, headers={"authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json"}, timeout=120)
        return r, time.monotonic() - start

    took, (response, attack_took) = _served_meanwhile(client, attack)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert attack_took < 15
    assert took < 3 * usual + 5, (took, usual)
    # a chunked body (no Content-Length) is counted as it arrives
    def chunks():
        for _ in range(50):
            yield b"x" * (1 << 20)

    r = httpx.post(url, content=chunks(), headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=120)
    assert r.status_code == 413


def test_a_5_mb_grpc_prompt_is_refused_without_stalling_anyone(cluster, client):
    usual = _usual_time(client)

    def attack():
        with pytest.raises(grpc.RpcError) as e:
            Client(cluster.address, api_key=CLIENT_KEY).complete("word " * (1 << 20), max_tokens=1, timeout=120)
        return e.value

    took, error = _served_meanwhile(client, attack)
    assert error.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
    assert took < 3 * usual + 5, (took, usual)
    # Under the receive limit but longer than the context can hold: refused by its length, untokenized.
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        client.complete("word " * 100_000, max_tokens=1, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "characters" in e.value.details()
    assert time.monotonic() - start < 10


def test_a_requests_own_chat_template_is_refused(cluster):
    looping = "{% for i in range(10**9) %}{% for j in range(10**9) %}x{% endfor %}{% endfor %}"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "chat_template_kwargs": {"chat_template": looping}}
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    start = time.monotonic()
    r = httpx.post(f"{cluster.router.http_url}/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs.chat_template"
    assert time.monotonic() - start < 10
    body["chat_template_kwargs"] = {"some_variable": "x" * 100}
    r = httpx.post(f"{cluster.router.http_url}/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs.some_variable"


def test_ten_thousand_stop_strings_are_refused_on_both_apis(cluster, client):
    stops = [f"stop{i}" for i in range(10_000)]
    with pytest.raises(grpc.RpcError) as e:
        client.complete(PROMPT, max_tokens=4, stop=stops, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stop" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.complete(PROMPT, max_tokens=4, stop=["s" * 10_000], timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    r = httpx.post(f"{cluster.router.http_url}/completions", json={"prompt": PROMPT, "max_tokens": 4, "stop": stops},
                   headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert client.complete(PROMPT, max_tokens=4, stop=["never-seen-1", "never-seen-2"], ignore_eos=True, timeout=60).completion_tokens == 4


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"])
def test_non_finite_sampling_values_are_refused_on_both_apis(cluster, client, field):
    for value in (math.inf, -math.inf, math.nan):
        with pytest.raises(grpc.RpcError) as e:
            client.complete(PROMPT, max_tokens=2, timeout=60, **{field: value})
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
    for literal in ("1e999", "-1e999", "NaN", "Infinity"):
        body = '{"prompt": "hi", "max_tokens": 2, "%s": %s}' % (field, literal)
        r = httpx.post(f"{cluster.router.http_url}/completions", content=body,
                       headers={"authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json"}, timeout=60)
        assert r.status_code == 400, (field, literal, r.text)


def test_bytes_that_do_not_parse_are_invalid_argument_and_log_no_traceback(cluster):
    garbage = {
        "invalid UTF-8 in text": b"\x12\x04\xff\xfe\xfd\xfc",
        "a lone surrogate": b"\x12\x03\xed\xa0\x80",
        "not protobuf": b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    }
    with grpc.insecure_channel(cluster.address) as channel:
        generate = channel.unary_stream("/splitserve.v1.Generation/Generate", request_serializer=None, response_deserializer=None)
        for what, data in garbage.items():
            with pytest.raises(grpc.RpcError) as e:
                list(generate(data, metadata=_auth(CLIENT_KEY), timeout=30))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
            assert "DecodeError" not in e.value.details()
    time.sleep(0.5)
    assert "Traceback" not in cluster.router.output()


# -- admission under overload -------------------------------------------------------------


def test_a_burst_past_max_inflight_gets_only_resource_exhausted(e2e_model_dir):
    """1200 streams at once, more than gRPC core's default queue of calls not yet picked up (1000),
    which used to cancel a few of them at random (the issue measured it against --max-inflight 1024).

    64 long streams fill --max-inflight first and are still generating when the burst arrives, so
    the burst meets a full router on any machine (on a fast one, 1200 short requests alone finished
    faster than they arrived and none was refused)."""
    holders, limit = 64, 64

    async def run(address: str) -> tuple[list[grpc.StatusCode], list[grpc.StatusCode]]:
        client = AsyncClient(address)
        admitted = 0
        full = asyncio.Event()

        async def call(coro) -> grpc.StatusCode:
            try:
                await coro
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    details.add(f"{e.code().name}: {e.details()}")
                return e.code()

        async def hold() -> None:
            nonlocal admitted
            first = True
            async for _ in client.stream(PROMPT, max_tokens=256, ignore_eos=True, timeout=300):
                if first:
                    first = False
                    admitted += 1
                    if admitted == holders:
                        full.set()

        try:
            held = [asyncio.ensure_future(call(hold())) for _ in range(holders)]
            await asyncio.wait_for(full.wait(), 240)
            burst = await asyncio.gather(*(call(client.complete(PROMPT, max_tokens=4, ignore_eos=True, timeout=300))
                                           for _ in range(1200)))
            return list(await asyncio.gather(*held)), list(burst)
        finally:
            await client.close()

    details: set[str] = set()
    cluster = Cluster(e2e_model_dir, ["--max-inflight", str(limit)], ["--num-blocks", "2048"])
    try:
        cluster.add_workers(("prefill", "prefill-b"), ("decode", "decode-b"))
        held, burst = asyncio.run(run(cluster.address))
        assert set(held) == {grpc.StatusCode.OK}, (held, details)
        assert set(burst) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, details
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in burst
        assert Client(cluster.address).complete(PROMPT, max_tokens=2, timeout=60).token_ids  # the slots come back
        text = httpx.get(f"http://127.0.0.1:{cluster.router.metrics_port}/metrics").text
        counted = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "splitserve_errors_total" and s.labels.get("kind") == "queue_full"]
        assert counted == [burst.count(grpc.StatusCode.RESOURCE_EXHAUSTED)]  # every refusal counted
    finally:
        cluster.stop()


# -- ports ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["router", "up"])
def test_a_second_router_or_up_on_a_busy_port_exits_with_one_line(cluster, e2e_model_dir, command):
    """grpcio's SO_REUSEPORT would let it start and share the port with the running router."""
    port = cluster.address.rsplit(":", 1)[1]
    args = ["--model", str(e2e_model_dir), "--port", port, "--http-port", "-1"]
    result = subprocess.run(
        [sys.executable, "-m", "splitserve.cli", command, *args, *(["--metrics-port", "-1"] if command == "router" else [])],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 2
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], lines


# -- a second router of the platform --------------------------------------------------------


def test_a_second_router_needs_the_worker_key_of_the_store_it_joins(cluster, e2e_model_dir, tmp_path):
    """A router on another router's embedded store presents the worker key: without it the store
    refuses it, and it says so in one line at start instead of failing every request."""
    base = [sys.executable, "-m", "splitserve.cli", "router", "--model", str(e2e_model_dir), "--port", "0",
            "--metrics-port", "-1", "--http-port", "-1", "--control-plane", f"grpc://{cluster.address}"]
    refused = subprocess.run(base, capture_output=True, text=True, timeout=180)
    assert refused.returncode == 2
    lines = [line for line in (refused.stdout + refused.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "refused this router" in lines[0], lines

    (tmp_path / "workers").write_text(f"{WORKER_KEY}\n")
    second = subprocess.Popen([*base, "--worker-keys-file", str(tmp_path / "workers")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        address = None
        for line in second.stdout:
            if "listening on" in line:
                address = line.split("listening on ")[1].split()[0]
                break
        assert address is not None, "the second router did not start"
        c = Client(address)
        try:
            assert c.complete(PROMPT, max_tokens=4, temperature=0, ignore_eos=True, timeout=120).completion_tokens == 4
        finally:
            c.close()
    finally:
        second.terminate()
        second.wait(timeout=60)
