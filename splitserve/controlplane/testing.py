"""Helpers for tests (and benchmarks) that need a real Redis or an async test body.

    from splitserve.controlplane.testing import require_redis_server, start_redis_server

    @pytest.fixture
    def redis_server(tmp_path):
        require_redis_server()           # skips visibly; fails instead under CI=true
        server = start_redis_server(tmp_path)
        yield server                     # server.url, server.process, server.kill()
        server.stop()
"""
from __future__ import annotations

import asyncio
import functools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REDIS_SERVER = "redis-server"


@dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    data_dir: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-run, as a crashed Redis would."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis_server(data_dir: Path, port: int | None = None, timeout_seconds: float = 10.0) -> RedisServer:
    """Starts ``redis-server`` on loopback (a free port unless given), without persistence.

    Waits until it answers PING. A free port can be taken by someone else
    between finding and binding it, so that case is retried on another port.
    """
    binary = shutil.which(REDIS_SERVER)
    if binary is None:
        raise FileNotFoundError(f"{REDIS_SERVER} is not installed (Debian: apt-get install redis-server)")
    data_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(1 if port is not None else 3):
        chosen = port if port is not None else free_port()
        log = open(data_dir / f"redis-{chosen}.log", "wb")
        process = subprocess.Popen(
            [binary, "--port", str(chosen), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(data_dir), "--daemonize", "no", "--protected-mode", "no"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if _wait_for_pong(chosen, process, timeout_seconds):
            return RedisServer(f"redis://127.0.0.1:{chosen}/0", chosen, process, data_dir)
        if process.poll() is None:
            process.kill()
            process.wait()
    raise RuntimeError(f"{REDIS_SERVER} did not start; see the logs in {data_dir}")


def require_redis_server() -> None:
    """Skips the calling test when redis-server is missing, visibly; under CI=true fails it instead."""
    if shutil.which(REDIS_SERVER) is not None:
        return
    import pytest

    message = f"{REDIS_SERVER} is not installed (Debian: apt-get install redis-server)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Runs an ``async def`` test on a fresh event loop, keeping its fixture arguments."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


def _wait_for_pong(port: int, process: subprocess.Popen[bytes], timeout_seconds: float) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return True
        except OSError:
            pass
        time.sleep(0.02)
    return False
