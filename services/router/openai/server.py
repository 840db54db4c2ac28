"""uvicorn serving the HTTP API inside the router's event loop, next to the grpc.aio server."""
from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn
from fastapi import FastAPI

from splitserve.services.security import TLSConfig


class _EmbeddedServer(uvicorn.Server):
    """Leaves signals alone: the router's own handler drains gRPC and HTTP together."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    def install_signal_handlers(self) -> None:  # uvicorn before 0.29
        pass


class HttpServer:
    """Binds at construction (so the port is known, and a taken port fails at once); ``start`` serves."""

    def __init__(self, app: FastAPI, host: str, port: int, tls: TLSConfig | None, drain_seconds: float) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.socket = socket.create_server((host, port), family=family)
        except OSError as e:  # the CLI turns a bind error that names its address into one line
            raise OSError(e.errno, e.strerror, f"{host}:{port} (the HTTP API)") from None
        self.port = self.socket.getsockname()[1]
        self.scheme = "https" if tls is not None and tls.cert is not None else "http"
        config = uvicorn.Config(
            app,
            log_config=None,  # keep the process's logging as the CLI set it up
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=drain_seconds,
            ssl_certfile=str(tls.cert) if self.scheme == "https" else None,
            ssl_keyfile=str(tls.key) if self.scheme == "https" else None,
        )
        self.server = _EmbeddedServer(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self.server.serve(sockets=[self.socket]))
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises why it could not start
                raise RuntimeError("the HTTP server stopped before it started")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stops accepting, lets in-flight requests finish (up to the drain time), closes."""
        if self._task is None:
            return
        self.server.should_exit = True
        while not self._task.done():
            # uvicorn closes idle keep-alive connections at once; over TLS, asyncio then waits up to
            # 30 s for the client's close_notify, which an idle client never sends: drop those.
            for connection in list(self.server.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None and transport.is_closing():
                    transport.abort()
            await asyncio.wait({self._task}, timeout=0.2)
        self._task.result()
