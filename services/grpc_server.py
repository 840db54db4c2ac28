"""What every splitserve gRPC server has: health checking, reflection, a metrics port, graceful stop."""
from __future__ import annotations

import asyncio
import logging
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class PortInUse(OSError):
    """A listener's port is taken; the message names the address."""


class ServiceHost:
    """One grpc.aio server with health and reflection for the given service names.

    ``max_receive_bytes``: the largest message a caller may send (the router's public port
    sizes it to the largest valid request); ``max_concurrent_rpcs``: calls past it are refused
    RESOURCE_EXHAUSTED by grpcio before any handler runs (None: no limit).
    """

    def __init__(
        self, service_names: list[str], registry: CollectorRegistry, max_receive_bytes: int = MAX_MESSAGE_BYTES,
        max_concurrent_rpcs: int | None = None,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # grpcio sets SO_REUSEPORT by default: a second server on a busy port would start
            # and the kernel would split connections between the two. Off, binding fails.
            ("grpc.so_reuseport", 0),
        ]
        if max_concurrent_rpcs is not None:
            # Calls that arrived but that grpcio has not yet picked up wait in gRPC core's pending
            # queue; past its soft limit (1000 by default) core cancels some at random, and the
            # client sees CANCELLED, which it rarely retries. Room for a burst of several times the
            # limit (10k at least) lets each call reach grpcio, which answers RESOURCE_EXHAUSTED.
            max_pending = max(4 * max_concurrent_rpcs, 10_000)
            options += [("grpc.server.max_pending_requests", max_pending), ("grpc.server.max_pending_requests_hard_limit", 2 * max_pending)]
        self.server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_concurrent_rpcs)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = service_names
        reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.registry = registry

    def bind(self, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
        """Binds ``address``; raises PortInUse naming it when it cannot (taken, or not this host's)."""
        _check_free(address)  # a clean one-line error before grpcio logs its own
        try:
            port = self.server.add_secure_port(address, credentials) if credentials else self.server.add_insecure_port(address)
        except RuntimeError:  # grpcio >= 1.5x raises instead of returning 0
            port = 0
        if port == 0:
            raise PortInUse(f"cannot listen on {address}: the port is in use (or the address is not this host's)")
        return port

    async def start(self, metrics_port: int | None) -> int | None:
        await self.server.start()
        await self.set_serving(True)
        if metrics_port is not None:
            server, _ = start_http_server(metrics_port, addr="127.0.0.1" if metrics_port == 0 else "0.0.0.0", registry=self.registry)
            return server.server_port
        return None

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def stop(self, grace: float) -> None:
        """Stops taking new calls (health turns NOT_SERVING), lets in-flight ones finish within ``grace``."""
        await self.set_serving(False)
        await self.server.stop(grace)


def _check_free(address: str) -> None:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if port == "0":
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
        try:
            probe.bind((host, int(port)))
        except OSError as e:
            raise PortInUse(f"cannot listen on {address}: {e.strerror}") from None
