"""The embedded mode's wire: workers reaching the router-hosted store over gRPC."""
from __future__ import annotations

import time

import grpc
import pytest

from splitserve.controlplane import (
    ControlPlaneServicer,
    ControlPlaneUnavailable,
    KVEvent,
    MemoryControlPlane,
    RemoteControlPlane,
    WorkerInfo,
    WorkerLoad,
    connect,
)
from splitserve.controlplane.testing import free_port, run_async
from splitserve.v1 import controlplane_pb2 as pb
from splitserve.v1 import controlplane_pb2_grpc as pb_grpc

FAST_SECONDS = 2.0


async def start_router_store() -> tuple[grpc.aio.Server, MemoryControlPlane, str]:
    store = MemoryControlPlane()
    server = grpc.aio.server()
    ControlPlaneServicer(store).add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, store, f"grpc://127.0.0.1:{port}"


@run_async
async def test_workers_reach_the_routers_store_through_connect():
    server, store, url = await start_router_store()
    worker = await connect(url)
    assert isinstance(worker, RemoteControlPlane)
    await worker.register(WorkerInfo("p0", "prefill", "127.0.0.1:7000", 16), ttl_seconds=5, load=WorkerLoad(num_running=2))
    await worker.publish_kv_events("p0", [KVEvent.stored([b"a" * 16, b"b" * 16])])
    # The router reads its own store directly, with no RPC on the routing path.
    assert [w.info.worker_id for w in await store.live_workers("prefill")] == ["p0"]
    assert await store.match_prefix([b"a" * 16, b"b" * 16], ["p0"]) == {"p0": 2}
    await worker.close()
    await server.stop(grace=None)


@run_async
async def test_no_router_at_start_is_a_clear_error():
    url = f"grpc://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ControlPlaneUnavailable, match=f"no control plane answers at {url}"):
        await connect(url, timeout_seconds=0.3)
    assert time.monotonic() - start < FAST_SECONDS
    with pytest.raises(ValueError, match="host:port"):
        await connect("grpc://")


@run_async
async def test_a_router_gone_mid_run_is_unavailable_fast():
    server, _, url = await start_router_store()
    worker = await connect(url)
    await worker.register(WorkerInfo("p0", "prefill", "127.0.0.1:7000", 16), ttl_seconds=5)
    await server.stop(grace=None)
    start = time.monotonic()
    with pytest.raises(ControlPlaneUnavailable, match=url):
        await worker.heartbeat("p0", WorkerLoad())
    assert time.monotonic() - start < FAST_SECONDS
    await worker.close()


@run_async
async def test_bad_messages_are_invalid_argument():
    server, _, url = await start_router_store()
    target = url.removeprefix("grpc://")
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ControlPlaneStub(channel)
        bad_requests = [
            stub.Register(pb.RegisterRequest(info=pb.WorkerInfo(worker_id="p0", role="router", block_size=16, tp_size=1), ttl_seconds=5)),
            stub.Register(pb.RegisterRequest(info=pb.WorkerInfo(worker_id="p0", role="prefill", block_size=16, tp_size=1))),
            stub.PublishKVEvents(pb.PublishKVEventsRequest(worker_id="p0", events=[pb.KVEvent(kind=pb.KV_EVENT_KIND_STORED, block_hashes=[b"x"])])),
            stub.PublishKVEvents(pb.PublishKVEventsRequest(worker_id="p0", events=[pb.KVEvent()])),
            stub.LiveWorkers(pb.LiveWorkersRequest(role="router")),
        ]
        for call in bad_requests:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call
            assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    worker = await RemoteControlPlane.connect(target)
    with pytest.raises(ValueError, match="ttl_seconds"):
        await worker.register(WorkerInfo("p0", "prefill", "h:1", 16), ttl_seconds=0)
    await worker.close()
    await server.stop(grace=None)
