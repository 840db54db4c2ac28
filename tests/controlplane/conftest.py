"""Fixtures: a real redis-server for the session, and each store behind one async face."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from splitserve.controlplane import ControlPlane, ControlPlaneServicer, MemoryControlPlane, RedisControlPlane, RemoteControlPlane
from splitserve.controlplane.testing import RedisServer, require_redis_server, start_redis_server

STORE_KINDS = ("memory", "redis", "remote")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    require_redis_server()
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own, for tests that kill, pause or restart it."""
    require_redis_server()
    server = start_redis_server(tmp_path / "redis")
    yield server
    server.stop()


class StoreBackend:
    """One store, and as many clients of it as a test wants ("router replicas", workers).

    memory: every client is the one in-process store; redis: each client is its
    own connection pool; remote: each client is its own channel to a servicer
    backed by one MemoryControlPlane. Enter it inside the test's event loop.
    """

    def __init__(self, kind: str, redis_url: str | None) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self._clients: list[ControlPlane] = []
        self._memory: MemoryControlPlane | None = None
        self._server: grpc.aio.Server | None = None
        self._target = ""

    async def __aenter__(self) -> StoreBackend:
        if self.kind == "redis":
            redis.Redis.from_url(self.redis_url).flushall()
        else:
            self._memory = MemoryControlPlane()
        if self.kind == "remote":
            self._server = grpc.aio.server()
            ControlPlaneServicer(self._memory).add_to_server(self._server)
            self._target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
            await self._server.start()
        return self

    async def client(self) -> ControlPlane:
        if self.kind == "memory":
            return self._memory
        if self.kind == "redis":
            store = await RedisControlPlane.connect(self.redis_url)
        else:
            store = await RemoteControlPlane.connect(self._target)
        self._clients.append(store)
        return store

    async def __aexit__(self, *exc_info: object) -> None:
        for store in self._clients:
            await store.close()
        if self._server is not None:
            await self._server.stop(grace=None)


@pytest.fixture(params=STORE_KINDS)
def backend(request: pytest.FixtureRequest) -> StoreBackend:
    redis_url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    return StoreBackend(request.param, redis_url)
