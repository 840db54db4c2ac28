"""The per-peer circuit breaker: one failure backs a peer off, one probe decides, backoff doubles."""
from __future__ import annotations

from splitserve.kvtransfer.breaker import PeerBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_failure_backs_the_peer_off_then_one_probe_resumes_it():
    clock = Clock()
    breaker = PeerBreaker(backoff=5.0, max_backoff=60.0, probe_timeout=20.0, clock=clock)
    assert breaker.allow("p") and not breaker.is_open("p")
    assert breaker.failed("p") == 5.0
    assert breaker.failed("p") is None  # a second read of the same wave: still one opening
    assert not breaker.allow("p") and breaker.is_open("p")
    assert breaker.allow("q")  # other peers are not affected
    clock.now += 5.0
    assert breaker.allow("p")  # the probe
    assert not breaker.allow("p")  # only one
    breaker.succeeded("p")
    assert breaker.allow("p") and breaker.allow("p")


def test_a_failed_probe_doubles_the_backoff_up_to_the_cap():
    clock = Clock()
    breaker = PeerBreaker(backoff=5.0, max_backoff=12.0, probe_timeout=20.0, clock=clock)
    lengths = []
    for _ in range(4):
        lengths.append(breaker.failed("p"))
        clock.now += lengths[-1]
        assert breaker.allow("p")
    assert lengths == [5.0, 10.0, 12.0, 12.0]


def test_a_probe_that_never_reports_lets_another_request_probe():
    clock = Clock()
    breaker = PeerBreaker(backoff=1.0, max_backoff=1.0, probe_timeout=20.0, clock=clock)
    breaker.failed("p")
    clock.now += 1.0
    assert breaker.allow("p")
    clock.now += 19.0
    assert not breaker.allow("p")
    clock.now += 1.0
    assert breaker.allow("p")
