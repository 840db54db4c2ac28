"""The router's event loop, as the simulator sees it: one server that handles one message at a
time, each costing ``message_s`` of its (single-threaded) CPU.

What passes through it, as in ``services/router/generation.py`` and ``decode_streams.py``:

  admit   a new request: received, checked, routed and dispatched (one message's worth);
  tokens  a request's generator wakes, reads *everything* that arrived for it since its last
          read and sends it to its client as one message.

The second is what keeps a saturated router from falling ever further behind: a request
with tokens waiting is queued once, however many steps' tokens pile up before its turn, so
the loop's work per step is at most one message per running request, and when it is behind
a request's tokens of several steps leave together (``splitserve_router_merged_steps``).
A new request's admission and its first token queue behind whatever the loop has in hand,
which is why TTFT grows with the number of streams a router serves while the engines' steps
do not change.

The simulator drives it with events: ``submit`` returns the time the loop must next be
looked at (None when it is already busy), ``finish`` hands back the item just served.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Served:
    kind: str  # "admit" or "tokens"
    request_id: int
    num_tokens: int  # tokens sent in this message ("tokens"); 0 for "admit"


class RouterLoop:
    def __init__(self, message_s: float) -> None:
        if message_s <= 0:
            raise ValueError(f"message_s must be positive, got {message_s}")
        self.message_s = message_s
        self._queue: deque[tuple[str, int]] = deque()
        self._pending: dict[int, int] = {}  # request id -> tokens waiting for its next turn; present = queued
        self._current: Served | None = None  # in service; a request's generator read its tokens when its turn began
        self.num_messages = 0
        self.num_merged = 0  # tokens that left in one message with an earlier token of theirs

    def admit(self, request_id: int, now: float) -> float | None:
        self._queue.append(("admit", request_id))
        return self._start(now)

    def token(self, request_id: int, now: float) -> float | None:
        if request_id in self._pending:
            self._pending[request_id] += 1  # its generator has not had its turn yet: one message takes both
            return None
        self._pending[request_id] = 1
        self._queue.append(("tokens", request_id))
        return self._start(now)

    def _start(self, now: float) -> float | None:
        if self._current is not None or not self._queue:
            return None
        kind, request_id = self._queue.popleft()
        self._current = Served(kind, request_id, self._pending.pop(request_id) if kind == "tokens" else 0)
        return now + self.message_s

    def finish(self, now: float) -> tuple[Served, float | None]:
        """The item whose service ends ``now``, and when the next one ends (None: idle)."""
        served, self._current = self._current, None
        self.num_messages += 1
        self.num_merged += max(served.num_tokens - 1, 0)
        return served, self._start(now)
