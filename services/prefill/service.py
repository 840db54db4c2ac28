"""The prefill worker: computes a prompt's KV, samples the first token, pins the blocks under a lease."""
from __future__ import annotations

import asyncio
import dataclasses
import logging


from splitserve.engine.engine import RequestOutput
from splitserve.kvtransfer import LeaseTable
from splitserve.services.convert import token_logprob_to_proto
from splitserve.services.engine_loop import Finished
from splitserve.services.sleep_rpc import SleepRPCs
from splitserve.services.worker import WorkerRuntime
from splitserve.services.worker_calls import accept, next_output, run_engine_request
from splitserve.v1 import generation_pb2 as gen_pb
from splitserve.v1 import worker_pb2 as worker_pb
from splitserve.v1 import worker_pb2_grpc

log = logging.getLogger(__name__)


class PrefillService(SleepRPCs, worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.leases = LeaseTable()
        self.lease_seconds = runtime.config.transfer.lease_seconds
        runtime.on_sleep.append(self._release_all)

    async def start(self) -> None:
        self.runtime.spawn(self._expire_leases())
        self.runtime.spawn(self._watch_notifications())

    async def Prefill(self, request: worker_pb.PrefillRequest, context) -> worker_pb.PrefillResponse:
        request_id, prompt, params = await accept(request.request, context, self.runtime)
        # Only the first token is sampled here; the decode worker samples the rest.
        first_params = dataclasses.replace(params, max_tokens=1)
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
        response.prompt_logprobs.extend(token_logprob_to_proto(t.token_id, t) for t in out.prompt_logprobs)
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
            if self.runtime.sleep_mode.sleeping:  # its agent is closed, or about to be
                await asyncio.sleep(0.05)
                continue
            for note in self.runtime.agent.poll_notifications():
                self._release(note.message.decode() if isinstance(note.message, bytes) else note.message)
            await asyncio.sleep(0.002)

    async def _release_all(self) -> None:
        """Falling asleep: KV not read within the drain is let go (its reader will prefill itself)."""
        for lease in self.leases.expire(now=float("inf")):
            self.runtime.loop.release(lease.request_id)

    async def drain(self) -> None:
        """On shutdown: wait briefly for pinned KV to be read, then release what is left."""
        for _ in range(50):
            if not len(self.leases):
                break
            await asyncio.sleep(0.1)
        for lease in self.leases.expire(now=float("inf")):
            self.runtime.loop.release(lease.request_id)
