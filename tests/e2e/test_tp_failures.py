"""A TP rank that dies takes its worker down cleanly instead of hanging the others.

Real processes: router, a prefill worker, a decode worker at TP=2 (rank 0 plus one rank
process, gloo) and one at TP=1. The decode worker's rank 1 is SIGKILLed mid-stream.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.client import Client, build_request
from splitserve.testing.cluster import wait_until
from splitserve.v1 import generation_pb2_grpc

pytestmark = pytest.mark.slow


def rank_processes(pid: int) -> list[int]:
    """Children of ``pid`` running splitserve.parallel.rank."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"splitserve.parallel.rank" in cmdline:
            found.append(int(stat.parent.name))
    return found


class Stream(threading.Thread):
    """One Generate call consumed in the background: its tokens, then its end (status code)."""

    def __init__(self, stub, prompt: list[int], max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.call = stub.Generate(build_request(prompt, max_tokens=max_tokens, ignore_eos=True), timeout=120)
        self.tokens: list[int] = []
        self.code: grpc.StatusCode | None = None
        self.start()

    def run(self) -> None:
        try:
            for response in self.call:
                self.tokens += response.delta.token_ids
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.code = e.code()


def test_a_killed_rank_takes_its_worker_down_and_the_router_stops_sending_to_it(start_cluster):
    cluster = start_cluster(router_args=["--policy", "round_robin"], worker_args=["--dtype", "float32", "--num-blocks", "512"])
    _, tp2, tp1 = cluster.add_workers(("prefill", "prefill-0"), ("decode", "decode-tp2", ["--tp-size", "2"]), ("decode", "decode-tp1"))
    (rank1,) = rank_processes(tp2.proc.pid)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(tp2.address)).Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
    assert next(health).status == health_pb2.HealthCheckResponse.SERVING

    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(cluster.address))
    max_tokens = 1500
    # Round robin over the two decode workers: two streams land on each.
    streams = [Stream(stub, list(range(10 + i, 40 + i)), max_tokens) for i in range(4)]
    assert wait_until(lambda: all(len(s.tokens) >= 3 for s in streams), timeout=60)
    assert all(s.code is None for s in streams), "streams ended before the rank was killed: raise max_tokens"
    os.kill(rank1, signal.SIGKILL)

    # Health turns NOT_SERVING (pushed to the watcher before the server stops)...
    statuses = []
    try:
        for update in health:
            statuses.append(update.status)
            if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
    except grpc.RpcError:
        pass
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    # ...the worker exits non-zero, and nothing hangs: every stream ends, well inside its deadline.
    assert tp2.proc.wait(timeout=60) == 1
    for s in streams:
        s.join(timeout=60)
    ends = sorted(s.code.name for s in streams)
    assert ends == ["OK", "OK", "UNAVAILABLE", "UNAVAILABLE"], ends + [tp2.output()[-3000:]]
    assert all(len(s.tokens) == max_tokens for s in streams if s.code == grpc.StatusCode.OK)
    assert "going down" in tp2.output() and "rank 1 exited" in tp2.output()

    # The worker deregistered: every new request goes to the live decode worker.
    client = Client(cluster.address)
    finished_before = tp1.stats().num_requests_finished
    for i in range(4):
        assert client.complete(list(range(50 + i, 70 + i)), max_tokens=4, ignore_eos=True, timeout=60).completion_tokens == 4
    assert wait_until(lambda: tp1.stats().num_requests_finished == finished_before + 4)
