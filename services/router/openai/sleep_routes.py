"""Sleep mode on the router's HTTP port: POST /sleep, POST /wake_up, GET /is_sleeping.

Each names a worker (``worker_id``, as the control plane lists it) and calls that worker's
Sleep or Wake over gRPC; the worker's next heartbeat (sent at once) takes it out of routing or
back in. The planner and operators use these; they take the worker credential (a key of the
router's --worker-keys-file), never a client's API key: see ``operator_check`` in app.py.
"""
from __future__ import annotations

import grpc
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from splitserve.services.router.openai.protocol import OpenAIError, parse
from splitserve.services.router.workers import WorkerDirectory

from splitserve.controlplane import LiveWorker
from splitserve.v1 import worker_pb2 as worker_pb
from splitserve.v1 import worker_pb2_grpc

SLEEP_RPC_SECONDS = 600.0  # a level-2 wake reloads the weights: minutes for a large model from a slow disk


class SleepBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    worker_id: str = Field(min_length=1, max_length=256)
    level: int = Field(default=1, ge=1, le=2)
    drain_seconds: float = Field(default=10.0, ge=0, le=3600)


class WakeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    worker_id: str = Field(min_length=1, max_length=256)


_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class SleepRoutes:
    def __init__(self, workers: WorkerDirectory) -> None:
        self.workers = workers

    async def sleep(self, request: Request) -> dict:
        body: SleepBody = parse(SleepBody, await request.body())
        worker = await self._worker(body.worker_id)
        reply = await self._call(worker, "Sleep", worker_pb.SleepRequest(level=body.level, drain_seconds=body.drain_seconds))
        return {"worker_id": body.worker_id, "level": reply.level, "seconds": reply.seconds, "num_ended": reply.num_ended}

    async def wake_up(self, request: Request) -> dict:
        body: WakeBody = parse(WakeBody, await request.body())
        worker = await self._worker(body.worker_id)
        reply = await self._call(worker, "Wake", worker_pb.WakeRequest())
        return {"worker_id": body.worker_id, "level": reply.level, "seconds": reply.seconds}

    async def is_sleeping(self, worker_id: str | None = None) -> dict:
        """One worker's state, or (no ``worker_id``) every live worker's, sleeping ones included."""
        if worker_id is not None:
            worker = await self._worker(worker_id)
            return {"worker_id": worker_id, "role": worker.info.role, "is_sleeping": worker.load.sleeping}
        workers = [w for role in ("prefill", "decode") for w in await self.workers.index.candidates(role)]
        return {"workers": [{"worker_id": w.info.worker_id, "role": w.info.role, "is_sleeping": w.load.sleeping} for w in workers]}

    async def _worker(self, worker_id: str) -> LiveWorker:
        for role in ("prefill", "decode"):
            for worker in await self.workers.index.candidates(role):  # sleeping ones included
                if worker.info.worker_id == worker_id:
                    return worker
        raise OpenAIError(404, f"no live worker {worker_id!r}", param="worker_id", code="not_found")

    async def _call(self, worker: LiveWorker, method: str, message) -> worker_pb.SleepResponse:
        channel = self.workers.channel(worker.info.address)
        stub = worker_pb2_grpc.PrefillWorkerStub(channel) if worker.info.role == "prefill" else worker_pb2_grpc.DecodeWorkerStub(channel)
        try:
            reply = await getattr(stub, method)(message, timeout=SLEEP_RPC_SECONDS)
            self.workers.index.expire()  # the worker told the store before answering: route by that at once
            return reply
        except grpc.aio.AioRpcError as e:
            status = _STATUS.get(e.code(), 502)
            raise OpenAIError(status, f"{method} on {worker.info.worker_id}: {e.details()}", "server_error" if status >= 500 else "invalid_request_error",
                              code=e.code().name.lower()) from None
