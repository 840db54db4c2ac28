"""Rank 0's view of a TP group: a ModelRunner that drives the other rank processes.

``TPModelRunner`` looks like a ModelRunner to the engine: each ``execute`` sends STEP to
every other rank, runs rank 0's own shard (the collectives pair the ranks up) and waits for
their STEP_DONE. One reader thread per rank takes its replies; a rank that exits, reports
an error or misses the step deadline fails the whole group: every rank is terminated,
``execute`` and pending requests raise RankFailedError, and ``on_failure`` callbacks run.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from splitserve.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig
from splitserve.engine.model_runner import ModelRunner, Placeholders
from splitserve.engine.scheduler import SchedulerOutput
from splitserve.parallel import protocol as p
from splitserve.parallel.group import RankFailedError, RankSpec, TPOptions, abort_group, destroy_group, init_group, rank_model_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVAgentSpec:
    """Give every rank a NIXL agent over its KV cache: rank r's is named ``{name}.r{r}``."""

    name: str  # rank 0's agent name
    model: str  # the model name KVLayout carries

    def rank_name(self, rank: int) -> str:
        return self.name if rank == 0 else f"{self.name}.r{rank}"


@dataclass(frozen=True)
class RankInfo:
    """What a rank reported once it was ready."""

    rank: int
    num_blocks: int
    agent_name: str | None
    agent_metadata: bytes | None


class RankHandle:
    """Rank 0's end of one rank process: its pipe, its reader thread, its pending requests."""

    def __init__(self, rank: int, spec: RankSpec, on_lost: Callable[[str], None]) -> None:
        self.rank = rank
        ours, theirs = socket.socketpair()
        # A fresh interpreter, never a fork of a process holding CUDA, NIXL or gloo state.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "splitserve.parallel.rank", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], env={**os.environ, **spec.env},
        )
        theirs.close()  # so that the rank's death reads as EOF here
        self.channel = p.Channel(Connection(ours.detach()))
        self.channel.send(p.START, spec=spec.to_message())
        self.ready: queue.SimpleQueue = queue.SimpleQueue()
        self.steps_done: queue.SimpleQueue = queue.SimpleQueue()
        self.reclaimed: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._terminate_lock = threading.Lock()
        self._on_lost = on_lost
        self._reader = threading.Thread(target=self._read, name=f"tp-rank-{rank}-reader", daemon=True)
        self._reader.start()

    def request(self, kind: str, **fields) -> concurrent.futures.Future:
        """Sends a message that is answered (DONE, LOAD_KV_DONE); the future gets the reply."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            request_id = next(self._ids)
            self._pending[request_id] = future
        try:
            self.channel.send(kind, id=request_id, **fields)
        except OSError as e:
            self._resolve(request_id, RankFailedError(f"rank {self.rank} is gone: {e}"))
        return future

    def lost(self, reason: str) -> None:
        """This rank is hung or broken (seen by a caller): fail the group."""
        self._on_lost(reason)

    def fail_pending(self, error: BaseException) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    def _resolve(self, request_id: int, result: dict | BaseException) -> None:
        with self._lock:
            future = self._pending.pop(request_id, None)
        if future is None or future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    def _read(self) -> None:
        # The only thread that closes the socket, once the rank is gone: closing it under
        # a blocked reader (or twice) could close an fd number already reused elsewhere.
        try:
            self._read_until_gone()
        finally:
            self.channel.close()

    def _read_until_gone(self) -> None:
        while True:
            try:
                msg = self.channel.recv()
            except (EOFError, OSError):
                try:
                    code = self.process.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    code = None
                self._on_lost(f"rank {self.rank} exited (exit code {code})")
                return
            kind = msg["kind"]
            if kind == p.STEP_DONE:
                self.steps_done.put(True)
            elif kind in (p.DONE, p.LOAD_KV_DONE):
                self._resolve(msg.pop("id"), msg)
            elif kind == p.RECLAIMED:
                self.reclaimed.put(msg["blocks"])
            elif kind == p.READY:
                metadata = msg["agent_metadata"]
                self.ready.put(RankInfo(msg["rank"], msg["num_blocks"], None, p.decode_bytes(metadata) if metadata else None))
            elif kind == p.ERROR:
                self._on_lost(f"rank {self.rank} failed:\n{msg['error']}")

    def terminate(self, grace: float) -> None:
        """Ends the process; the reader then sees EOF and closes the socket."""
        with self._terminate_lock:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self.process.kill()  # also ends a stopped (SIGSTOPped) rank
                    self.process.wait(timeout=5)
        self._reader.join(timeout=5)


class TPModelRunner:
    """A TP group's ModelRunner, driven from rank 0 (this process)."""

    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        parallel: ParallelConfig,
        options: TPOptions = TPOptions(),
        kv_agents: KVAgentSpec | None = None,
    ) -> None:
        self.options = options
        self.tp_size = parallel.tensor_parallel_size
        self.error: RankFailedError | None = None
        self._failure_callbacks: list[Callable[[RankFailedError], None]] = []
        self._failed = threading.Event()
        self._closing = False
        self._fail_lock = threading.Lock()
        device = torch.device(rank_model_config(model_config, 0).device)
        backend = options.backend_for(device)
        store = dist.TCPStore(
            options.host, 0, self.tp_size, is_master=True, wait_for_workers=False,
            timeout=timedelta(seconds=options.startup_timeout_seconds),
        )

        def spec(rank: int) -> RankSpec:
            return RankSpec(
                rank=rank, world_size=self.tp_size, store_port=store.port, model=rank_model_config(model_config, rank),
                cache=cache_config, options=options, backend=backend,
                agent_name=kv_agents.rank_name(rank) if kv_agents else None, agent_model=kv_agents.model if kv_agents else "",
                env=options.env_for(backend), log_level=logging.getLevelName(logging.getLogger().level),
            )

        self.ranks = [RankHandle(r, spec(r), self._lost) for r in range(1, self.tp_size)]
        try:
            tp = self._while_ranks_live(lambda: init_group(spec(0), store), "joining the process group")
            self.local = ModelRunner(spec(0).model, cache_config, tp)
            self.infos = [self._wait_ready(handle, kv_agents) for handle in self.ranks]
        except BaseException:
            self._terminate_ranks()
            raise
        # Blocks past the smallest rank's cache are never handed out.
        self.num_blocks = min([self.local.num_blocks, *(info.num_blocks for info in self.infos)])

    # -- what the engine sees of a ModelRunner -------------------------------------------

    arch = property(lambda self: self.local.arch)
    max_model_len = property(lambda self: self.local.max_model_len)
    kv_cache = property(lambda self: self.local.kv_cache)  # rank 0's shard
    kv_scales_id = property(lambda self: self.local.kv_scales_id)  # the same on every rank (engine/kv_scales.py)
    kv_cache_dtype = property(lambda self: self.local.kv_cache_dtype)
    quantization = property(lambda self: self.local.quantization)
    dtype = property(lambda self: self.local.dtype)
    device = property(lambda self: self.local.device)
    block_size = property(lambda self: self.local.block_size)
    block_bytes = property(lambda self: self.local.block_bytes)  # of rank 0's shard
    kv_block_shape = property(lambda self: self.local.kv_block_shape)
    model = property(lambda self: self.local.model)

    def bind_thread(self) -> None:
        self.local.bind_thread()

    def execute(self, out: SchedulerOutput, placeholders: Placeholders | None = None) -> torch.Tensor:
        """Runs one step on every rank; returns rank 0's logits (gathered over the vocabulary)."""
        self._raise_if_failed()
        step = p.encode_step(out, placeholders)
        try:
            for handle in self.ranks:
                handle.channel.send(p.STEP, **step)
            logits = self.local.execute(out, placeholders)
        except Exception as e:
            self._lost(self._cause_of(e))
            raise self.error from e
        deadline = time.monotonic() + self.options.step_timeout_seconds
        for handle in self.ranks:
            self._wait(handle.steps_done, deadline, f"rank {handle.rank} did not finish its step")
        return logits

    # -- the group -----------------------------------------------------------------------

    def on_failure(self, callback: Callable[[RankFailedError], None]) -> None:
        """``callback(error)`` runs once, on whichever thread notices, when the group fails."""
        self._failure_callbacks.append(callback)
        if self.error is not None:
            callback(self.error)

    @property
    def failed(self) -> bool:
        return self._failed.is_set()

    def close(self) -> None:
        """Shuts the other ranks down: SHUTDOWN, every rank destroys the group at the same time
        (under NCCL a rank's destroy waits for its peers), then terminate what lingers."""
        self._closing = True
        healthy = self.error is None  # a failed group's device may not settle; the teardown below is bounded anyway
        if healthy:
            self.local.release_graphs()  # every rank drops its graphs before the group goes (NCCL waits on them)
        for handle in self.ranks:
            try:
                handle.channel.send(p.SHUTDOWN)
            except OSError:
                pass
        if healthy:
            self._destroy_group()
        for handle in self.ranks:
            try:
                handle.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._terminate_ranks()
        if not healthy:
            self._destroy_group()  # the other ranks are gone: nothing left to wait for

    @staticmethod
    def _destroy_group() -> None:
        try:
            destroy_group()
        except Exception:  # noqa: BLE001 - a broken group may not tear down cleanly; the process moves on
            log.warning("destroying the process group raised", exc_info=True)

    def _lost(self, reason: str) -> None:
        """A rank is gone or broken: fail everything waiting on the group, end the group."""
        with self._fail_lock:
            if self._closing or self.error is not None:
                return
            self.error = RankFailedError(f"tensor-parallel group failed: {reason}")
            self._failed.set()
        log.error("%s", self.error)
        # Announced before any waiting step is woken: whoever sees the step fail can rely on it.
        for callback in self._failure_callbacks:
            try:
                callback(self.error)
            except Exception:  # noqa: BLE001 - one bad callback must not hide the failure from the rest
                log.exception("TP failure callback failed")
        for handle in self.ranks:
            handle.fail_pending(self.error)
            handle.steps_done.put(False)  # wakes a step (or the start) waiting on this rank
            handle.ready.put(False)
        threading.Thread(target=self._end_group, name="tp-group-teardown", daemon=True).start()

    def _cause_of(self, error: Exception) -> str:
        """Rank 0's collective failed: usually because a rank died, which is the better reason."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for handle in self.ranks:
                code = handle.process.poll()
                if code is not None:
                    return f"rank {handle.rank} exited (exit code {code}) during a step"
            time.sleep(0.02)
        return f"step failed on rank 0: {type(error).__name__}: {error}"

    def _end_group(self) -> None:
        """After a failure. The CUDA graphs are not released here (close() does that): the
        engine thread may still be replaying one."""
        abort_group()  # collectives of rank 0 stuck on the dead rank return with an error
        self._terminate_ranks()

    def _terminate_ranks(self) -> None:
        for handle in self.ranks:
            handle.terminate(grace=2.0)

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _wait(self, replies: queue.SimpleQueue, deadline: float, what: str):
        try:
            reply = replies.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            self._lost(f"{what} within {self.options.step_timeout_seconds:.0f}s")
            raise self.error from None
        if reply is False or self.error is not None:
            raise self.error
        return reply

    def _wait_ready(self, handle: RankHandle, kv_agents: KVAgentSpec | None) -> RankInfo:
        deadline = time.monotonic() + self.options.startup_timeout_seconds
        info = self._wait(handle.ready, deadline, f"rank {handle.rank} did not load its shard")
        name = kv_agents.rank_name(handle.rank) if kv_agents else None
        return RankInfo(info.rank, info.num_blocks, name, info.agent_metadata)

    def _while_ranks_live(self, fn: Callable, what: str):
        """Runs ``fn`` (which blocks until every rank joins) but gives up as soon as a rank dies."""
        result: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                result.set_exception(e)

        threading.Thread(target=run, name="tp-join", daemon=True).start()
        deadline = time.monotonic() + self.options.startup_timeout_seconds
        while not result.done():
            if self.error is not None:
                raise RankFailedError(f"{what}: {self.error}")
            if time.monotonic() > deadline:
                raise RankFailedError(f"{what}: not every rank joined within {self.options.startup_timeout_seconds:.0f}s")
            time.sleep(0.05)
        return result.result()


def make_runner(
    config: EngineConfig, kv_agents: KVAgentSpec | None = None, options: TPOptions = TPOptions()
) -> ModelRunner | TPModelRunner:
    """The engine's runner for ``config.parallel``: a plain ModelRunner at TP=1."""
    if config.parallel.tensor_parallel_size == 1:
        return ModelRunner(config.model, config.cache)
    return TPModelRunner(config.model, config.cache, config.parallel, options, kv_agents)
