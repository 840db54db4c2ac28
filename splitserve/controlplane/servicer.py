"""The router-side gRPC face of the embedded store: workers on the same machine call it.

Thin by design: messages become domain objects here and the store behind it
(normally a MemoryControlPlane in the router's process) does the work.
"""
from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from splitserve.controlplane import convert
from splitserve.controlplane.interface import ControlPlane
from splitserve.controlplane.types import ControlPlaneUnavailable
from splitserve.v1 import controlplane_pb2 as pb
from splitserve.v1 import controlplane_pb2_grpc as pb_grpc

Response = TypeVar("Response")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Response]]


def _at_edge(handler: Handler[Response]) -> Handler[Response]:
    """Bad input becomes INVALID_ARGUMENT, a store that cannot be reached UNAVAILABLE."""

    @functools.wraps(handler)
    async def wrapped(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await handler(self, request, context)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ControlPlaneUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        raise AssertionError("context.abort raises")

    return wrapped


class ControlPlaneServicer(pb_grpc.ControlPlaneServicer):
    def __init__(self, store: ControlPlane) -> None:
        self._store = store

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_ControlPlaneServicer_to_server(self, server)

    @_at_edge
    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext) -> pb.Ack:
        info = convert.info_from_pb(request.info)
        await self._store.register(info, request.ttl_seconds, convert.load_from_pb(request.load))
        return pb.Ack()

    @_at_edge
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        registered = await self._store.heartbeat(request.worker_id, convert.load_from_pb(request.load))
        return pb.HeartbeatResponse(registered=registered)

    @_at_edge
    async def Deregister(self, request: pb.DeregisterRequest, context: grpc.aio.ServicerContext) -> pb.Ack:
        await self._store.deregister(request.worker_id)
        return pb.Ack()

    @_at_edge
    async def PublishKVEvents(self, request: pb.PublishKVEventsRequest, context: grpc.aio.ServicerContext) -> pb.Ack:
        if not request.worker_id:
            raise ValueError("worker_id must not be empty")
        events = [convert.event_from_pb(e) for e in request.events]
        await self._store.publish_kv_events(request.worker_id, events)
        return pb.Ack()

    @_at_edge
    async def LiveWorkers(self, request: pb.LiveWorkersRequest, context: grpc.aio.ServicerContext) -> pb.LiveWorkersResponse:
        if request.role not in ("", "prefill", "decode"):
            raise ValueError(f"role must be 'prefill', 'decode' or empty, got {request.role!r}")
        workers = await self._store.live_workers(request.role or None)  # type: ignore[arg-type]
        return pb.LiveWorkersResponse(workers=[convert.live_worker_to_pb(w) for w in workers])

    @_at_edge
    async def MatchPrefix(self, request: pb.MatchPrefixRequest, context: grpc.aio.ServicerContext) -> pb.MatchPrefixResponse:
        num_matched = await self._store.match_prefix(list(request.block_hashes), list(request.worker_ids))
        return pb.MatchPrefixResponse(num_matched_blocks=num_matched)
