"""What the engine tells the services about its state and about the requests it finished.

``EngineStats`` is a snapshot (gauges, and counters since the engine started);
``RequestTimes`` are the intervals of one finished request, as vLLM's metrics design defines
them: queued -> first scheduled (queue), scheduled -> first token (prefill), first token ->
last token (decode), scheduled -> last token (inference), queued -> last token (end to end).
All times are this process's monotonic clock; only intervals leave it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from splitserve.engine.speculative import SpecStats


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int = 0
    num_running: int = 0
    num_loading: int = 0  # KV transfer under way
    num_held: int = 0  # finished, blocks kept for another worker
    num_total_blocks: int = 0
    num_free_blocks: int = 0  # cached blocks nobody uses count as free: they are evicted on demand
    num_pinned_blocks: int = 0
    num_prompt_tokens_computed: int = 0
    num_prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    num_prefix_hit_tokens: int = 0
    num_generation_tokens: int = 0  # tokens this engine sampled (a first token from elsewhere is not)
    num_preemptions: int = 0
    num_discarded_rows: int = 0  # async scheduling: rows computed for requests that had stopped
    num_tokens_in_flight: int = 0  # accepted prompt tokens not computed yet
    spec: SpecStats | None = None  # speculative decoding's counters, when it is on

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks in use, 0 to 1."""
        return 1.0 - self.num_free_blocks / self.num_total_blocks if self.num_total_blocks else 0.0


@dataclass(frozen=True)
class RequestTimes:
    finish_reason: str
    queue_seconds: float
    prefill_seconds: float
    decode_seconds: float
    inference_seconds: float
    e2e_seconds: float


@dataclass
class _Clock:
    queued: float
    scheduled: float | None = None
    first_token: float | None = None


@dataclass
class RequestClock:
    """Timestamps of the requests in the engine; finished ones become RequestTimes until drained."""

    _clocks: dict[str, _Clock] = field(default_factory=dict)
    _unscheduled: set[str] = field(default_factory=set)
    _finished: list[RequestTimes] = field(default_factory=list)

    def queued(self, request_id: str) -> None:
        self._clocks[request_id] = _Clock(time.monotonic())
        self._unscheduled.add(request_id)

    def scheduled(self, request_id: str, at: float) -> None:
        self._clocks[request_id].scheduled = at
        self._unscheduled.discard(request_id)

    @property
    def unscheduled(self) -> set[str]:
        return self._unscheduled

    def token(self, request_id: str, finish_reason: str | None) -> None:
        clock = self._clocks.get(request_id)
        if clock is None:
            return
        now = time.monotonic()
        if clock.first_token is None:
            clock.first_token = now
        if finish_reason is None:
            return
        del self._clocks[request_id]
        scheduled = clock.scheduled if clock.scheduled is not None else clock.queued
        self._finished.append(
            RequestTimes(
                finish_reason=finish_reason,
                queue_seconds=scheduled - clock.queued,
                prefill_seconds=clock.first_token - scheduled,
                decode_seconds=now - clock.first_token,
                inference_seconds=now - scheduled,
                e2e_seconds=now - clock.queued,
            )
        )

    def forget(self, request_ids) -> None:
        for request_id in request_ids:
            self._clocks.pop(request_id, None)
            self._unscheduled.discard(request_id)

    def __len__(self) -> int:
        return len(self._clocks)

    def known(self) -> list[str]:
        return list(self._clocks)

    def drain(self) -> list[RequestTimes]:
        finished, self._finished = self._finished, []
        return finished
