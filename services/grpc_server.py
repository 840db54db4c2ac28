"""What every splitserve gRPC server has: health checking, reflection, a metrics port, graceful stop."""
from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ServiceHost:
    """One grpc.aio server with health and reflection for the given service names."""

    def __init__(self, service_names: list[str], registry: CollectorRegistry) -> None:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        self.server = grpc.aio.server(options=options)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = service_names
        reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.registry = registry

    def bind(self, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
        port = self.server.add_secure_port(address, credentials) if credentials else self.server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
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
