"""The prefill worker: computes a prompt's KV, samples the first token, pins the blocks under a lease."""
from __future__ import annotations

import asyncio
import dataclasses
import logging

import grpc

from splitserve.engine.engine import RequestOutput
from splitserve.engine.errors import InvalidRequestError, QueueFullError
from splitserve.kvtransfer import LeaseTable
from splitserve.logs import request_id_var
from splitserve.parallel import RankFailedError
from splitserve.services.convert import sampling_params_from_proto, token_logprob_to_proto
from splitserve.services.engine_loop import Finished
from splitserve.services.worker import WorkerRuntime
from splitserve.v1 import generation_pb2 as gen_pb
from splitserve.v1 import worker_pb2 as worker_pb
from splitserve.v1 import worker_pb2_grpc

log = logging.getLogger(__name__)


async def run_engine_request(runtime: WorkerRuntime, context, submit):
    """Submits through ``submit()`` and maps engine errors to gRPC statuses; returns the stream."""
    try:
        return submit()
    except InvalidRequestError as e:
        runtime.metrics.error("invalid_argument")
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except QueueFullError as e:
        runtime.metrics.error("queue_full")
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    except RuntimeError as e:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))


async def next_output(stream: asyncio.Queue, context):
    item = await stream.get()
    if isinstance(item, InvalidRequestError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
    if isinstance(item, QueueFullError):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(item))
    if isinstance(item, RankFailedError):  # the worker is going down; another one can serve the request
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(item))
    if isinstance(item, BaseException):
        await context.abort(grpc.StatusCode.INTERNAL, f"engine failed: {item}")
    return item


class PrefillService(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.leases = LeaseTable()
        self.lease_seconds = runtime.config.transfer.lease_seconds

    async def start(self) -> None:
        self.runtime.spawn(self._expire_leases())
        self.runtime.spawn(self._watch_notifications())

    async def Prefill(self, request: worker_pb.PrefillRequest, context) -> worker_pb.PrefillResponse:
        engine_request = request.request
        request_id = engine_request.request_id
        request_id_var.set(request_id)
        try:
            params = sampling_params_from_proto(engine_request)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        # Only the first token is sampled here; the decode worker samples the rest.
        first_params = dataclasses.replace(params, max_tokens=1)
        prompt = list(engine_request.prompt_token_ids)
        loop = self.runtime.loop
        stream = await run_engine_request(
            self.runtime, context, lambda: loop.submit(request_id, prompt, first_params, hold_kv=True)
        )
        try:
            out: RequestOutput = await next_output(stream, context)
            held: Finished = await next_output(stream, context)
        except asyncio.CancelledError:
            loop.abort(request_id)  # the router gave up: free the blocks now
            raise
        token_id = out.new_token_ids[0]
        first = token_logprob_to_proto(token_id, out.new_logprobs[0] if out.new_logprobs else None)
        finish = self._finish_reason(token_id, params)
        response = worker_pb.PrefillResponse(first_token=first, num_cached_tokens=out.num_cached_tokens, finish_reason=finish)
        if finish != gen_pb.FINISH_REASON_UNSPECIFIED:
            loop.release(request_id)
            return response
        self.leases.grant(request_id, held.block_ids, self.lease_seconds)
        response.kv.CopyFrom(
            worker_pb.KVHandle(
                worker_id=self.runtime.config.worker_id,
                address=self.runtime.config.address,
                agent_name=self.runtime.agent.name,
                block_ids=held.block_ids,
                num_tokens=len(prompt),
                lease_seconds=self.lease_seconds,
            )
        )
        response.kv.layout.CopyFrom(self.runtime.transfer_metadata().layout)
        return response

    def _finish_reason(self, token_id: int, params) -> int:
        eos = self.runtime.engine.eos_token_ids
        if (token_id in eos and not params.ignore_eos) or token_id in params.stop_token_ids:
            return gen_pb.FINISH_REASON_STOP
        if params.max_tokens == 1:
            return gen_pb.FINISH_REASON_LENGTH
        return gen_pb.FINISH_REASON_UNSPECIFIED

    def _release(self, request_id: str) -> bool:
        if self.leases.release(request_id) is None:
            return False
        self.runtime.loop.release(request_id)
        return True

    async def RenewLease(self, request: worker_pb.LeaseRequest, context) -> worker_pb.LeaseResponse:
        return worker_pb.LeaseResponse(held=self.leases.renew(request.request_id))

    async def ReleaseKV(self, request: worker_pb.LeaseRequest, context) -> worker_pb.LeaseResponse:
        return worker_pb.LeaseResponse(held=self._release(request.request_id))

    async def GetTransferMetadata(self, request, context) -> worker_pb.TransferMetadata:
        return self.runtime.transfer_metadata()

    async def GetStats(self, request, context) -> worker_pb.WorkerStats:
        return self.runtime.stats()

    async def _expire_leases(self) -> None:
        while True:
            for lease in self.leases.expire():
                log.warning("lease of %s expired; freeing its %d blocks", lease.request_id, len(lease.block_ids))
                self.runtime.metrics.error("lease_expired")
                self.runtime.loop.release(lease.request_id)
            await asyncio.sleep(0.1)

    async def _watch_notifications(self) -> None:
        """A decode worker's READ landed: its notification names the request, so free at once."""
        while True:
            for note in self.runtime.agent.poll_notifications():
                self._release(note.message.decode() if isinstance(note.message, bytes) else note.message)
            await asyncio.sleep(0.002)

    async def drain(self) -> None:
        """On shutdown: wait briefly for pinned KV to be read, then release what is left."""
        for _ in range(50):
            if not len(self.leases):
                break
            await asyncio.sleep(0.1)
        for lease in self.leases.expire(now=float("inf")):
            self.runtime.loop.release(lease.request_id)
