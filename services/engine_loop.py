"""Runs an LLMEngine in a thread of its own and bridges it to asyncio.

gRPC handlers never call the engine directly: they post commands (add, abort,
release, finish a KV load) that the engine thread applies between steps, and
read each request's outputs from an asyncio queue (or any sink with ``put_nowait``)
the thread feeds. One step's outputs cross to the event loop in one hand-over, not
one per request. The model never runs on the event loop.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from splitserve.engine.engine import LLMEngine, RequestOutput
from splitserve.engine.errors import InvalidRequestError, QueueFullError
from splitserve.engine.request import TokenLogprob
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import KVLoad, RemoteKV
from splitserve.engine.stats import EngineStats, RequestTimes

__all__ = ["EngineLoop", "EngineStats", "Finished", "Sink"]

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where a request's outputs go, on the event loop: an asyncio.Queue, or a stream's own collector."""

    def put_nowait(self, item: object) -> None: ...


@dataclass(frozen=True)
class Finished:
    """The last item on a request's queue when its blocks are held for another worker."""

    block_ids: list[int]


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        on_kv_load: Callable[[KVLoad], Awaitable[None]] | None = None,
        on_kv_events: Callable[[list[tuple[str, bytes]]], None] | None = None,
    ) -> None:
        """``on_kv_load`` runs on the event loop for each transfer the engine asks for;
        ``on_kv_events`` gets the prefix cache's stored/removed events, on the event loop."""
        self.engine = engine
        self.on_kv_load = on_kv_load
        self.on_kv_events = on_kv_events
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, Sink] = {}
        self._outbox: list[tuple[str, object, bool]] = []  # (request id, item, last): the engine thread's, until handed over
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats: EngineStats = engine.stats()
        # Finished requests' intervals, appended by the engine thread and taken by the metrics task.
        self.request_times: collections.deque[RequestTimes] = collections.deque(maxlen=100_000)
        self.error: BaseException | None = None
        self.refuse_with: Exception | None = None  # set while new requests must be refused (a sleeping worker)
        self.num_finished = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # -- called on the event loop ---------------------------------------------

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        remote_kv: RemoteKV | None = None,
        first_token: TokenLogprob | None = None,
        hold_kv: bool = False,
        sink: Sink | None = None,
    ) -> Sink:
        """Validates and queues a request; returns where its outputs arrive (``sink``, or a new asyncio.Queue).

        Items: RequestOutput, then (when ``hold_kv``) a Finished with the held block ids,
        or an exception if the engine failed.
        """
        if self.error is not None:
            raise RuntimeError(f"engine failed: {self.error}")
        if self.refuse_with is not None:
            raise self.refuse_with
        self.engine.validate(prompt_token_ids, params)
        if request_id in self._streams:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        if len(self._streams) >= self.engine.config.scheduler.max_waiting + self.engine.config.scheduler.max_num_seqs:
            raise QueueFullError(f"{len(self._streams)} requests in flight; try again later")
        stream = asyncio.Queue() if sink is None else sink
        self._streams[request_id] = stream
        self._post(("add", request_id, prompt_token_ids, params, remote_kv, first_token, hold_kv))
        return stream

    async def compile_constraint(self, params: SamplingParams) -> None:
        """Compiles a constrained request's grammar on a thread, before ``submit`` (which would
        otherwise compile it on the event loop); raises InvalidRequestError."""
        if params.constraint is not None:
            await asyncio.to_thread(self.engine.compile_constraint, params)

    def abort(self, request_id: str) -> None:
        """Ends the request and frees its blocks, wherever it is (held blocks included)."""
        self._streams.pop(request_id, None)
        self._post(("abort", request_id))

    def release(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def finish_kv_load(self, request_id: str, ok: bool, quarantine: frozenset[int] = frozenset()) -> None:
        self._post(("kv_loaded", request_id, ok, quarantine))

    def free_quarantined(self, block_ids: list[int]) -> None:
        self._post(("unquarantine", "", block_ids))

    def call(self, fn: Callable[[], object]) -> asyncio.Future:
        """Runs ``fn()`` on the engine thread between steps; the future (of this event loop) gets its result."""
        future = self._loop.create_future()
        self._post(("call", "", fn, future))
        return future

    def end_all(self, error: Exception) -> int:
        """Engine thread (through ``call``): ends every request, held ones included, each stream
        with ``error``; returns how many streams were ended."""
        request_ids = list(self._streams)
        for request_id in request_ids:
            self._send(request_id, error, last=True)
        for request_id in {*request_ids, *self.engine.scheduler.requests}:
            self.engine.abort(request_id)
        self._hand_over()
        return len(request_ids)

    def _post(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # -- the engine thread -----------------------------------------------------

    def _run(self) -> None:
        try:
            self.engine.runner.bind_thread()
            while not self._stopping:
                self._apply_commands()
                if not self.engine.has_unfinished:
                    self._hand_over()
                    self._publish_stats()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                result = self.engine.step()
                for load in result.kv_loads:
                    self._start_kv_load(load)
                for out in result.outputs:
                    self._deliver(out)
                self._hand_over()
                events = self.engine.block_pool.drain_kv_events()
                if self.engine.host_tier is not None:
                    events += [(kind, block_hash, "host") for kind, block_hash in self.engine.host_tier.drain_kv_events()]
                if events and self.on_kv_events is not None:
                    self._loop.call_soon_threadsafe(self.on_kv_events, events)
                self._publish_stats()
        except BaseException as exc:  # the engine is broken: fail every stream, loudly
            log.exception("engine loop failed")
            self.error = exc
            for request_id in list(self._streams):
                self._send(request_id, exc, last=True)
            self._hand_over()

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            kind, request_id = command[0], command[1]
            if kind == "add":
                _, _, prompt, params, remote_kv, first_token, hold_kv = command
                if request_id not in self._streams:
                    continue  # aborted before it was added
                try:
                    self.engine.enqueue(request_id, prompt, params, remote_kv=remote_kv, first_token=first_token, hold_kv=hold_kv)
                except (InvalidRequestError, QueueFullError) as exc:
                    self._send(request_id, exc, last=True)
            elif kind == "abort":
                self.engine.abort(request_id)
            elif kind == "kv_loaded":
                self.engine.finish_kv_load(request_id, command[2], command[3])
            elif kind == "unquarantine":
                self.engine.free_quarantined(command[2])
            elif kind == "call":
                self._call(command[2], command[3])

    def _call(self, fn: Callable[[], object], future: asyncio.Future) -> None:
        try:
            result = fn()
        except Exception as exc:  # the caller's to handle; the engine goes on
            self._loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            self._loop.call_soon_threadsafe(_settle, future, result, None)
        self._publish_stats()

    def _start_kv_load(self, load: KVLoad) -> None:
        if self.on_kv_load is None or not load.local_block_ids:
            self.engine.finish_kv_load(load.request_id, self.on_kv_load is not None)
            return
        asyncio.run_coroutine_threadsafe(self.on_kv_load(load), self._loop)

    def _deliver(self, out: RequestOutput) -> None:
        if not out.finished:
            self._send(out.request_id, out)
            return
        held = self.engine.scheduler.held.get(out.request_id)
        if held is None:
            self._send(out.request_id, out, last=True)
        else:
            self._send(out.request_id, out)
            self._send(out.request_id, Finished(self.engine.get_block_ids(out.request_id)), last=True)
        self.num_finished += 1

    def _send(self, request_id: str, item: object, last: bool = False) -> None:
        self._outbox.append((request_id, item, last))

    def _hand_over(self) -> None:
        """What this pass made goes to the event loop in one call (a wake-up of the loop costs a syscall)."""
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self._loop.call_soon_threadsafe(self._put, batch)

    def _put(self, batch: list[tuple[str, object, bool]]) -> None:
        """On the event loop: an aborted request's stream is gone, and its items go nowhere."""
        for request_id, item, last in batch:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(item)
                if last:
                    del self._streams[request_id]

    def _publish_stats(self) -> None:
        self.stats = self.engine.stats()
        self.request_times.extend(self.engine.drain_request_times())


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.done():
        return  # its caller went away
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
