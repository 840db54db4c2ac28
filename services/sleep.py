"""Sleep mode for a worker: drain or end its requests, free its GPU, stay registered, wake on demand.

While asleep the worker refuses every request with UNAVAILABLE (a decode worker marks it
"refused", so the router tries another), and reports ``sleeping`` in its load, so routers
leave it out; its control-plane index is cleared (its KV is gone). ``sleep`` first stops taking
requests, gives those in flight ``drain_seconds`` to finish, and ends the rest with UNAVAILABLE
("the worker went to sleep"): nothing waits on a worker that will not answer. Waking brings
back an empty KV cache under a new NIXL agent name, so peers treat it as a new incarnation and
handshake afresh (the cache's address changed).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from splitserve.kvtransfer import KVTransferAgent

from splitserve.controlplane import KVEvent
from splitserve.engine.sleep import LEVELS, EngineSleep
from splitserve.parallel import KVGroup

log = logging.getLogger(__name__)


class WorkerAsleepError(RuntimeError):
    """The worker is asleep (or falling asleep): this request was not served here."""


class SleepStateError(Exception):
    """Sleep or wake asked in a state that does not allow it (the message says why)."""


@dataclass(frozen=True)
class SleepOutcome:
    level: int  # the level now: 0 awake
    seconds: float  # how long the engine took to free or bring back its memory
    num_ended: int = 0  # requests ended because they did not finish within the drain


class SleepController:
    """One per worker; every transition goes through one lock, so sleep and wake never interleave."""

    def __init__(self, runtime, drain_poll_seconds: float = 0.02) -> None:
        self.runtime = runtime
        self._engine_sleep: EngineSleep | None = None
        self._lock = asyncio.Lock()
        self._poll = drain_poll_seconds
        self.refusing = False  # True from the start of a sleep to the end of the wake
        self.level = 0

    @property
    def sleeping(self) -> bool:
        return self.refusing

    async def sleep(self, level: int, drain_seconds: float) -> SleepOutcome:
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level}")
        if drain_seconds < 0:
            raise ValueError(f"drain_seconds must not be negative, got {drain_seconds}")
        runtime = self.runtime
        if runtime.config.engine.parallel.tensor_parallel_size > 1:
            raise SleepStateError("sleep mode needs a tensor parallel size of 1")
        async with self._lock:
            if self.level:
                raise SleepStateError(f"the worker is already asleep (level {self.level})")
            self.refusing = True
            # From here every submit is refused: only what is already in the engine's streams drains.
            runtime.loop.refuse_with = WorkerAsleepError("the worker is asleep")
            await runtime.presence.heartbeat_now()  # routers stop sending before the drain ends
            deadline = time.monotonic() + drain_seconds
            while (runtime.loop.num_in_flight or runtime.num_pinned()) and time.monotonic() < deadline:
                await asyncio.sleep(self._poll)
            await runtime.before_sleep()  # e.g. a prefill worker lets go of leased KV
            num_ended = await runtime.loop.call(lambda: runtime.loop.end_all(WorkerAsleepError("the worker went to sleep")))
            runtime.agent.close()  # deregisters the KV cache before its memory goes
            engine_sleep = self._engine_sleep or EngineSleep(runtime.engine)
            self._engine_sleep = engine_sleep
            seconds = await runtime.loop.call(lambda: engine_sleep.sleep(level))
            runtime.engine.block_pool.drain_kv_events()  # the clear below says it all
            if runtime.engine.host_tier is not None:
                runtime.engine.host_tier.drain_kv_events()
            await runtime.presence.publish([KVEvent.cleared()])
            self.level = level
        log.info("asleep at level %d in %.2f s (%d requests ended)", level, seconds, num_ended)
        return SleepOutcome(level, seconds, num_ended)

    async def wake(self) -> SleepOutcome:
        runtime = self.runtime
        async with self._lock:
            if not self.level:
                raise SleepStateError("the worker is awake")
            engine_sleep = self._engine_sleep
            seconds = await runtime.loop.call(engine_sleep.wake)
            # A new agent name: peers that knew the old cache address handshake again.
            name = f"{runtime.config.worker_id}-{uuid.uuid4().hex[:8]}"
            runtime.agent = KVTransferAgent(name, runtime.engine.runner.kv_cache, runtime.layout)
            runtime.kv = KVGroup(runtime.agent, [], [])
            await runtime.after_wake()
            self.level = 0
            self.refusing = False
            runtime.loop.refuse_with = None
            await runtime.presence.heartbeat_now()
        log.info("awake in %.2f s", seconds)
        return SleepOutcome(0, seconds)
