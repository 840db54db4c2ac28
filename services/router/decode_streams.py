"""The router's one Decode stream to each decode worker, shared by all the requests it sends there.

Requests start and are cancelled with commands on the stream; the worker's messages carry
updates for many requests at once, and each goes to its request's ``DecodeUpdates``. A
request reads everything that arrived for it since its last read in one go, so when the
router falls behind, its clients get fewer, larger messages instead of a growing backlog.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from splitserve.v1 import worker_pb2 as worker_pb
from splitserve.v1 import worker_pb2_grpc

log = logging.getLogger(__name__)

STATUS_BY_CODE = {code.value[0]: code for code in grpc.StatusCode}


class DecodeFailed(Exception):
    """A request failed on the decode worker (alone), or the stream it was on broke."""

    def __init__(self, code: grpc.StatusCode, details: str, refused: bool = False) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.refused = refused  # the worker did nothing with it: it may go to another one


class DecodeUpdates:
    """One request's updates, as they arrive; ``next()`` returns all that are waiting."""

    __slots__ = ("stream", "request_id", "_pending", "_ready", "_error", "_expiry")

    def __init__(self, stream: DecodeStream, request_id: str, timeout: float | None) -> None:
        self.stream, self.request_id = stream, request_id
        self._pending: list[worker_pb.DecodeUpdate] = []
        self._ready = asyncio.Event()
        self._error: DecodeFailed | None = None
        self._expiry = None if timeout is None else asyncio.get_running_loop().call_later(
            timeout, self.fail, DecodeFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed")
        )

    def add(self, update: worker_pb.DecodeUpdate) -> None:
        self._pending.append(update)
        self._ready.set()

    def fail(self, error: DecodeFailed) -> None:
        """The stream broke (updates still pending are dropped; a finished request is no longer here) or the deadline passed."""
        self._error = error
        self._ready.set()

    async def next(self) -> list[worker_pb.DecodeUpdate]:
        """The updates that arrived since the last call (at least one); raises DecodeFailed."""
        await self._ready.wait()
        self._ready.clear()
        if self._error is not None:  # the stream broke or the deadline passed: what is pending is not the whole answer
            raise self._error
        updates, self._pending = self._pending, []
        for update in updates:
            if update.error_code:
                raise DecodeFailed(STATUS_BY_CODE.get(update.error_code, grpc.StatusCode.UNKNOWN), update.error_message, update.refused)
        return updates

    def cancel(self) -> None:
        """The router is done with it (finished, a stop string, its client gone, a refusal): the
        worker frees it unless it has finished it, and its deadline is off."""
        if self._expiry is not None:
            self._expiry.cancel()
        self.stream.cancel(self.request_id)


class DecodeStream:
    def __init__(self, stub: worker_pb2_grpc.DecodeWorkerStub, address: str) -> None:
        self.address = address
        self._commands: asyncio.Queue[worker_pb.DecodeCommand | None] = asyncio.Queue()
        self._requests: dict[str, DecodeUpdates] = {}
        self.closed = False
        self.draining = False  # the worker is shutting down: nothing new goes on this stream
        self._answered = False  # the worker has sent something on this stream
        self._call = stub.Decode(self._outgoing())
        self._reader = asyncio.ensure_future(self._read())

    def start(self, request: worker_pb.DecodeRequest, timeout: float | None = None) -> DecodeUpdates:
        """Sends the request; its updates fail DEADLINE_EXCEEDED after ``timeout`` seconds. Raises
        DecodeFailed when the worker is draining (UNAVAILABLE: try another) or one of the same id
        is on this stream already (INVALID_ARGUMENT)."""
        request_id = request.request.request_id
        if self.draining or self.closed:
            raise DecodeFailed(grpc.StatusCode.UNAVAILABLE, f"the decode worker at {self.address} is shutting down", refused=True)
        if request_id in self._requests:
            raise DecodeFailed(grpc.StatusCode.INVALID_ARGUMENT, f"request_id {request_id!r} is already in flight")
        updates = self._requests[request_id] = DecodeUpdates(self, request_id, timeout)
        self._commands.put_nowait(worker_pb.DecodeCommand(start=request))
        return updates

    def cancel(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is not None and not self.closed:
            self._commands.put_nowait(worker_pb.DecodeCommand(cancel=request_id))
            self._close_if_drained()

    def _close_if_drained(self) -> None:
        """A draining worker waits for the router to close the stream, once its requests are done."""
        if self.draining and not self._requests:
            self._commands.put_nowait(None)

    async def _outgoing(self):
        while (command := await self._commands.get()) is not None:
            yield command

    async def _read(self) -> None:
        error = DecodeFailed(grpc.StatusCode.UNAVAILABLE, f"the decode worker at {self.address} ended its stream")
        try:
            async for message in self._call:
                self._answered = True
                self.draining = self.draining or message.draining
                for update in message.updates:
                    updates = self._requests.get(update.request_id)
                    if updates is None:
                        continue  # cancelled here while the worker was still sending
                    if update.finish_reason or update.error_code:  # its last: nothing to cancel any more
                        del self._requests[update.request_id]
                    updates.add(update)
                self._close_if_drained()
        except grpc.aio.AioRpcError as e:
            # Unreachable before it ever answered (gone, or not yet up): none of its requests got
            # anywhere, so each may go to another decode worker (the prefill KV is still pinned).
            unreachable = e.code() == grpc.StatusCode.UNAVAILABLE and not self._answered
            error = DecodeFailed(e.code(), e.details() or "", refused=unreachable)
        except asyncio.CancelledError:
            error = DecodeFailed(grpc.StatusCode.CANCELLED, "the router is shutting down")
            raise
        finally:
            self.closed = True
            self._commands.put_nowait(None)  # the request iterator ends too
            for updates in self._requests.values():
                updates.fail(error)
            self._requests.clear()

    async def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
