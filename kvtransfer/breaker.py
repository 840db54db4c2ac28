"""Backing off a KV peer whose transfers fail, so that requests stop waiting out its timeouts.

Per peer, a circuit breaker: *closed* (read from it), *open* after a failure (every request
is prefilled locally until the retry time), then *probing*: one request reads from it again;
its success closes the breaker, its failure opens it for twice as long (up to a cap).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

CLOSED, OPEN, PROBING = "closed", "open", "probing"


@dataclass
class _State:
    state: str = CLOSED
    retry_at: float = 0.0  # OPEN: when a probe may go
    probe_started: float = 0.0  # PROBING: a probe whose outcome never came is given up after a while
    backoff: float = 0.0  # the next opening's length


class PeerBreaker:
    """Used from one event loop. ``backoff``: the first opening's length; each failed probe
    doubles it up to ``max_backoff``. A probe that reports nothing within ``probe_timeout``
    (its request was dropped on the way) lets another request probe."""

    def __init__(
        self, backoff: float, max_backoff: float, probe_timeout: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.backoff = backoff
        self.max_backoff = max(max_backoff, backoff)
        self.probe_timeout = probe_timeout
        self._clock = clock
        self._peers: dict[str, _State] = {}

    def allow(self, peer: str) -> bool:
        """Whether a new request may read from ``peer``; True at most once per probe."""
        s = self._peers.get(peer)
        if s is None or s.state == CLOSED:
            return True
        now = self._clock()
        if (s.state == OPEN and now >= s.retry_at) or (s.state == PROBING and now - s.probe_started >= self.probe_timeout):
            s.state, s.probe_started = PROBING, now
            return True
        return False

    def is_open(self, peer: str) -> bool:
        """Backed off now: a read already admitted gives up before it starts."""
        s = self._peers.get(peer)
        return s is not None and s.state == OPEN and self._clock() < s.retry_at

    def succeeded(self, peer: str) -> None:
        self._peers.pop(peer, None)

    def failed(self, peer: str) -> float | None:
        """Opens the breaker; returns for how long, or None when it was open already (reads
        that were in flight together fail together: one opening, not one each)."""
        s = self._peers.setdefault(peer, _State(backoff=self.backoff))
        if s.state == OPEN:
            return None
        length = s.backoff
        s.state, s.retry_at = OPEN, self._clock() + length
        s.backoff = min(2 * length, self.max_backoff)
        return length

    def forget(self, peer: str) -> None:
        self._peers.pop(peer, None)
