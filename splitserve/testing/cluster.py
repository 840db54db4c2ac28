"""Real splitserve processes on loopback for tests: a router, prefill and decode workers, gRPC and NIXL."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from splitserve.v1 import worker_pb2 as worker_pb
from splitserve.v1 import worker_pb2_grpc

READY = re.compile(r"splitserve (\w+) listening on (\S+)")
HTTP_URL = re.compile(r"OpenAI-compatible HTTP API at (\S+?)[;)]")
METRICS_PORT = re.compile(r"\(metrics on :(\d+)\)")
START_TIMEOUT = 180.0


class Service:
    """One `splitserve <role>` process; its output is kept for failure messages."""

    def __init__(
        self, role: str, args: list[str], env: dict[str, str], credentials: grpc.ChannelCredentials | None = None, worker_key: str | None = None
    ) -> None:
        self.role = role
        self.credentials = credentials  # to call a worker directly when it requires (mutual) TLS
        self.worker_key = worker_key  # ... or a worker key
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "splitserve.cli", role, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self.address: str | None = None
        self.http_url: str | None = None  # the router's OpenAI-compatible API, ".../v1"
        self.metrics_port: int | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            match = READY.search(line)
            if match and self.address is None:
                http, metrics = HTTP_URL.search(line), METRICS_PORT.search(line)
                self.http_url = http.group(1) if http else None
                self.metrics_port = int(metrics.group(1)) if metrics else None
                self.address = match.group(2)
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> str:
        self._ready.wait(timeout)
        if self.address is None:
            self.kill()
            raise RuntimeError(f"{self.role} did not start:\n{''.join(self.lines[-40:])}")
        return self.address

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def stats(self) -> worker_pb.WorkerStats:
        channel = grpc.secure_channel(self.address, self.credentials) if self.credentials else grpc.insecure_channel(self.address)
        with channel:
            stub_cls = worker_pb2_grpc.PrefillWorkerStub if self.role == "prefill" else worker_pb2_grpc.DecodeWorkerStub
            metadata = (("authorization", f"Bearer {self.worker_key}"),) if self.worker_key else None
            return stub_cls(channel).GetStats(worker_pb.StatsRequest(), timeout=10, metadata=metadata)

    def output(self) -> str:
        return "".join(self.lines)


class Cluster:
    """A router with its embedded control plane, and any number of workers registered with it."""

    def __init__(
        self, model_dir: Path, router_args: list[str] = (), worker_args: list[str] = (), control_plane: str | None = None,
        *, router_tls: bool = False, worker_credentials: grpc.ChannelCredentials | None = None, worker_key: str | None = None,
    ) -> None:
        """``control_plane``: a shared store's URL (redis://...); None: the router's embedded one.

        ``router_tls``: the router's listener is TLS (router_args has --tls-cert), so workers reach
        its embedded store over grpcs://; ``worker_credentials``: for calling workers directly
        (``Service.stats``) when they require TLS; ``worker_key``: the same when they require a worker
        key (worker_args has --worker-keys-file). The router serves HTTP on a free port
        (``router.http_url``) unless router_args says otherwise.
        """
        self.model_dir = model_dir
        self.worker_args = list(worker_args)
        self.worker_credentials = worker_credentials
        self.worker_key = worker_key
        if control_plane is not None:
            router_args = ["--control-plane", control_plane, *router_args]
        if "--http-port" not in router_args:
            router_args = ["--http-port", "0", *router_args]
        self.env = {**os.environ, "NIXL_LOG_LEVEL": "WARN", "PYTHONUNBUFFERED": "1"}
        self.router = Service("router", ["--model", str(model_dir), "--port", "0", "--metrics-port", "0", *router_args], self.env)
        self.address = self.router.wait_ready()
        self.control_plane = control_plane or f"{'grpcs' if router_tls else 'grpc'}://{self.address}"
        self.workers: list[Service] = []

    def add_workers(self, *specs: tuple[str, str] | tuple[str, str, list[str]], extra: list[str] = ()) -> list[Service]:
        """Starts workers in parallel; ``specs``: (role, worker_id), or (role, worker_id, that
        worker's own arguments, e.g. its --device). Waits for each one's ready line, which it prints
        once registered with the control plane (the router's list catches up within its refresh)."""
        started = []
        for role, worker_id, *own in specs:
            args = ["--model", str(self.model_dir), "--port", "0", "--metrics-port", "0", "--worker-id", worker_id,
                    "--control-plane", self.control_plane, "--drain-seconds", "5", *self.worker_args, *extra,
                    *(own[0] if own else ())]
            started.append(Service(role, args, self.env, self.worker_credentials, self.worker_key))
        for service in started:
            service.wait_ready()
        self.workers += started
        return started

    def stop(self) -> None:
        """Workers drain together (each up to its --drain-seconds), then the router they leave."""
        for service in self.workers:
            service.signal(signal.SIGCONT)
            service.signal(signal.SIGTERM)
        for service in [*self.workers, self.router]:
            service.stop()


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class UpProcess:
    """`splitserve up ARGS` in its own process group; its output is kept in ``lines``.

    ``wait_for(pattern)`` returns the first line's match (failing with the last lines printed),
    ``stop()`` is Ctrl-C: up drains its workers, then the router; a group that does not end
    within ``timeout`` is killed. Returns the exit status.
    """

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "splitserve.cli", "up", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "NIXL_LOG_LEVEL": "WARN"},
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern, timeout: float = 300.0) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = next((m for m in map(pattern.search, self.lines) if m), None)
                if match is not None:
                    return match
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = "".join(self.lines[-40:])
                    raise RuntimeError(f"splitserve up printed no line matching {pattern.pattern!r}:\n{tail}")
                self._changed.wait(min(left, 1.0))

    def stop(self, timeout: float = 90.0) -> int | None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return None


def complete_concurrently(address: str, prompts: list[list[int]], max_tokens: list[int], timeout: float = 120) -> list:
    """Sends every prompt at once (ignore_eos, so each makes exactly its max_tokens) and returns the Completions in order."""
    import asyncio

    from splitserve.client import AsyncClient

    async def run():
        client = AsyncClient(address)
        try:
            return await asyncio.gather(*(client.complete(p, max_tokens=m, ignore_eos=True, timeout=timeout) for p, m in zip(prompts, max_tokens)))
        finally:
            await client.close()

    return asyncio.run(run())
