"""A worker's client of the embedded store that the router hosts (``grpc://host:port``)."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence

import grpc

from splitserve.controlplane import convert
from splitserve.controlplane.interface import ControlPlane, check_ttl
from splitserve.controlplane.types import ControlPlaneUnavailable, KVEvent, LiveWorker, Role, WorkerInfo, WorkerLoad
from splitserve.v1 import controlplane_pb2 as pb
from splitserve.v1 import controlplane_pb2_grpc as pb_grpc

# A router that is gone or stuck reads as "unavailable", like a lost Redis.
_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


class RemoteControlPlane(ControlPlane):
    """Use ``await RemoteControlPlane.connect("host:port")``; it fails at once if nothing answers there."""

    def __init__(self, channel: grpc.aio.Channel, target: str, timeout_seconds: float) -> None:
        self._channel = channel
        self._stub = pb_grpc.ControlPlaneStub(channel)
        self._target = target
        self._timeout = timeout_seconds

    @classmethod
    async def connect(cls, target: str, *, timeout_seconds: float = 1.0) -> RemoteControlPlane:
        channel = grpc.aio.insecure_channel(target)
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout_seconds)
        except asyncio.TimeoutError:
            await channel.close()
            raise ControlPlaneUnavailable(
                f"no control plane answers at grpc://{target} (is the router running?)"
            ) from None
        return cls(channel, target, timeout_seconds)

    async def register(self, info: WorkerInfo, ttl_seconds: float, load: WorkerLoad | None = None) -> None:
        check_ttl(ttl_seconds)
        request = pb.RegisterRequest(
            info=convert.info_to_pb(info), ttl_seconds=ttl_seconds, load=convert.load_to_pb(load or WorkerLoad())
        )
        with self._unavailable_on_error():
            await self._stub.Register(request, timeout=self._timeout)

    async def heartbeat(self, worker_id: str, load: WorkerLoad) -> bool:
        request = pb.HeartbeatRequest(worker_id=worker_id, load=convert.load_to_pb(load))
        with self._unavailable_on_error():
            response = await self._stub.Heartbeat(request, timeout=self._timeout)
        return response.registered

    async def deregister(self, worker_id: str) -> None:
        with self._unavailable_on_error():
            await self._stub.Deregister(pb.DeregisterRequest(worker_id=worker_id), timeout=self._timeout)

    async def publish_kv_events(self, worker_id: str, events: Sequence[KVEvent]) -> None:
        request = pb.PublishKVEventsRequest(worker_id=worker_id, events=[convert.event_to_pb(e) for e in events])
        with self._unavailable_on_error():
            await self._stub.PublishKVEvents(request, timeout=self._timeout)

    async def live_workers(self, role: Role | None = None) -> list[LiveWorker]:
        with self._unavailable_on_error():
            response = await self._stub.LiveWorkers(pb.LiveWorkersRequest(role=role or ""), timeout=self._timeout)
        return [convert.live_worker_from_pb(w) for w in response.workers]

    async def match_prefix(self, block_hashes: Sequence[bytes], worker_ids: Sequence[str]) -> dict[str, int]:
        request = pb.MatchPrefixRequest(block_hashes=block_hashes, worker_ids=worker_ids)
        with self._unavailable_on_error():
            response = await self._stub.MatchPrefix(request, timeout=self._timeout)
        return {worker_id: response.num_matched_blocks.get(worker_id, 0) for worker_id in dict.fromkeys(worker_ids)}

    async def close(self) -> None:
        await self._channel.close()

    @contextlib.contextmanager
    def _unavailable_on_error(self) -> Iterator[None]:
        try:
            yield
        except grpc.aio.AioRpcError as e:
            if e.code() in _UNAVAILABLE:
                raise ControlPlaneUnavailable(f"control plane at grpc://{self._target}: {e.details()}") from e
            if e.code() is grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(e.details()) from e
            raise
