"""What the router knows about the workers' load, as stale as the real one's.

Workers heartbeat their load every ``heartbeat_s`` (a third of their 3 s registration TTL,
services/worker.py), the router re-reads the registry every ``refresh_s``
(services/router/index.py), and between reads it raises each worker's load by what it has
itself routed there and not yet seen come back, taking the larger of the two counts, as
``RoutingIndex._with_in_flight`` does. A request counts against a prefill worker from
dispatch until its first token returns, and against a decode worker from its first decode
token until its stream ends (``GenerationService``): a colocated engine's prompt is not
counted while it prefills, which is why stale load matters there.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from splitserve.controlplane.types import WorkerLoad


@dataclass(frozen=True)
class ViewTiming:
    heartbeat_s: float = 1.0
    refresh_s: float = 0.5

    def __post_init__(self) -> None:
        if not (self.heartbeat_s > 0 and self.refresh_s > 0):
            raise ValueError(f"heartbeat_s and refresh_s must be positive: {self}")


class RouterView:
    def __init__(self, worker_ids: list[str], timing: ViewTiming) -> None:
        self.timing = timing
        self._published: dict[str, WorkerLoad] = dict.fromkeys(worker_ids, WorkerLoad())
        self._seen: dict[str, WorkerLoad] = dict(self._published)
        self._requests: Counter = Counter()
        self._tokens: Counter = Counter()
        self._blocks: Counter = Counter()

    def publish(self, worker_id: str, load: WorkerLoad) -> None:
        self._published[worker_id] = load

    def refresh(self) -> None:
        self._seen = dict(self._published)

    def track(self, worker_id: str, num_tokens: int = 0, num_blocks: int = 0, sign: int = 1) -> None:
        self._requests[worker_id] += sign
        self._tokens[worker_id] += sign * num_tokens
        self._blocks[worker_id] += sign * num_blocks

    def load(self, worker_id: str) -> WorkerLoad:
        load = self._seen[worker_id]
        if not self._requests[worker_id]:
            return load
        used = max(load.num_total_blocks - load.num_free_blocks, min(self._blocks[worker_id], load.num_total_blocks))
        return WorkerLoad(
            num_waiting=max(load.num_waiting, self._requests[worker_id] - load.num_running),
            num_running=load.num_running,
            num_tokens_in_flight=max(load.num_tokens_in_flight, self._tokens[worker_id]),
            num_free_blocks=load.num_total_blocks - used,
            num_total_blocks=load.num_total_blocks,
        )
