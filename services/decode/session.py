"""One router's Decode stream on a decode worker.

The router starts and cancels requests on it; what the engine makes for them collects in
an outbox, one DecodeUpdate per request, and goes back in one message. While a message
waits for the router to read (HTTP/2 flow control), later steps merge into the outbox, so
a router that falls behind gets fewer, larger messages instead of a growing queue.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from splitserve.engine.engine import RequestOutput
from splitserve.services.convert import FINISH_TO_PROTO, token_logprob_to_proto
from splitserve.services.worker_calls import RequestFailed, engine_error_status
from splitserve.v1 import worker_pb2 as worker_pb

if TYPE_CHECKING:
    from splitserve.services.decode.service import DecodeService


class RequestSink:
    """Where the engine loop puts one request's outputs: into its session's outbox."""

    __slots__ = ("session", "request_id")

    def __init__(self, session: RouterSession, request_id: str) -> None:
        self.session, self.request_id = session, request_id

    def put_nowait(self, item: object) -> None:
        self.session.collect(self.request_id, item)


class RouterSession:
    def __init__(self, service: DecodeService) -> None:
        self.service = service
        self.live: dict[str, int] = {}  # request id -> prompt tokens served from a prefix cache (for usage)
        self.outbox: dict[str, worker_pb.DecodeUpdate] = {}
        self.wake = asyncio.Event()
        self.router_done = False  # the router closed its side: end once the live requests are done (on draining, it does)
        self._starts: set[asyncio.Task] = set()  # requests being set up (a KV handshake may wait)
        self._last_sent: dict[str, float] = {}
        self._itl = service.runtime.metrics.itl.labels("decode")

    async def run(self, commands: AsyncIterator[worker_pb.DecodeCommand]) -> AsyncIterator[worker_pb.DecodeUpdates]:
        reader = asyncio.ensure_future(self._read(commands))
        told_draining = False
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                tell_draining = self.service.draining and not told_draining
                if self.outbox or tell_draining:
                    updates, self.outbox = self.outbox, {}
                    self._observe(updates)
                    told_draining = told_draining or tell_draining
                    yield worker_pb.DecodeUpdates(updates=updates.values(), draining=tell_draining)
                # Only the router ends the stream: a write it made after the worker had ended it would fail the call.
                if self.router_done and not self.live and not self.outbox and not self._starts:
                    return
        finally:
            reader.cancel()
            for task in list(self._starts):
                task.cancel()
            for request_id in list(self.live):  # the stream ended under them: the router is gone
                self.end(request_id)

    async def _read(self, commands: AsyncIterator[worker_pb.DecodeCommand]) -> None:
        try:
            async for command in commands:
                if command.HasField("start"):
                    task = asyncio.ensure_future(self._start(command.start))
                    self._starts.add(task)
                    task.add_done_callback(self._starts.discard)
                elif command.cancel:
                    self.end(command.cancel)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass  # the stream itself ended; run()'s finally frees what is left
        finally:
            self.router_done = True
            self.wake.set()

    async def _start(self, request: worker_pb.DecodeRequest) -> None:
        request_id = request.request.request_id
        if request_id in self.live:  # the updates could not tell the two apart: both end (a router refuses duplicates itself)
            self._fail(request_id, RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, f"request_id {request_id!r} is already in flight"))
            return
        self.live[request_id] = request.num_cached_tokens
        try:
            if self.service.draining:
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "the decode worker is draining", refused=True)
            if self.service.runtime.sleep_mode.sleeping:
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "the decode worker is asleep", refused=True)
            await self.service.start_request(request, RequestSink(self, request_id), still_wanted=lambda: request_id in self.live)
        except RequestFailed as e:
            if request_id in self.live:
                self._fail(request_id, e)
        finally:
            self.wake.set()  # run() may be waiting for the last start to settle

    def collect(self, request_id: str, item: object) -> None:
        """An engine output (or failure) for one request, merged into its pending update."""
        if request_id not in self.live:
            return
        if isinstance(item, BaseException):
            self._fail(request_id, engine_error_status(item, grpc.StatusCode.INTERNAL))
            return
        out: RequestOutput = item
        update = self.outbox.get(request_id)
        if update is None:
            update = self.outbox[request_id] = worker_pb.DecodeUpdate(request_id=request_id)
        logprobs = out.new_logprobs
        update.tokens.extend(
            token_logprob_to_proto(t, logprobs[i] if i < len(logprobs) else None) for i, t in enumerate(out.new_token_ids)
        )
        update.num_cached_tokens = max(self.live[request_id], out.num_cached_tokens)
        update.prompt_logprobs.extend(token_logprob_to_proto(t.token_id, t) for t in out.prompt_logprobs)
        if out.finished:
            update.finish_reason = FINISH_TO_PROTO[out.finish_reason]
            del self.live[request_id]
            self.service.forget(request_id)
        self.wake.set()

    def end(self, request_id: str) -> None:
        """Cancelled, failed or orphaned before it finished: the engine drops it and the prefill worker lets go."""
        if self.live.pop(request_id, None) is None:
            return  # finished already (its last update may still be on its way: the router ignores it)
        self.outbox.pop(request_id, None)
        self._last_sent.pop(request_id, None)
        self.service.abort(request_id)

    def _fail(self, request_id: str, failure: RequestFailed) -> None:
        self.end(request_id)
        self.outbox[request_id] = worker_pb.DecodeUpdate(
            request_id=request_id, error_code=failure.code.value[0], error_message=failure.message, refused=failure.refused
        )
        self.wake.set()

    def _observe(self, updates: dict[str, worker_pb.DecodeUpdate]) -> None:
        now = time.perf_counter()
        for request_id, update in updates.items():
            last = self._last_sent.get(request_id)
            if last is not None:
                self._itl.observe(now - last)
            if request_id in self.live:
                self._last_sent[request_id] = now
            else:
                self._last_sent.pop(request_id, None)
