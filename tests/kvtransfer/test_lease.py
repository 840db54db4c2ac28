"""LeaseTable: every granted block comes back exactly once, by release or by expiry."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from splitserve.kvtransfer import LeaseTable


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_expiry_with_a_fake_clock():
    clock = FakeClock()
    table = LeaseTable(clock)
    table.grant("a", [1, 2], ttl=10.0)
    table.grant("b", [3], ttl=5.0)
    assert table.next_expiry() == 5.0

    clock.now = 4.0
    assert table.renew("b")  # now expires at 9
    clock.now = 9.0
    assert [lease.request_id for lease in table.expire()] == ["b"]
    assert not table.renew("b") and table.release("b") is None
    assert table.num_pinned_blocks == 2

    clock.now = 10.0
    assert not table.renew("a")  # past its time: not revived, due back from expire()
    assert [lease.block_ids for lease in table.expire()] == [(1, 2)]
    assert len(table) == 0 and table.next_expiry() is None


def test_release_returns_blocks_once():
    table = LeaseTable(FakeClock())
    table.grant("a", [4, 5], ttl=1.0)
    assert table.release("a") == [4, 5]
    assert table.release("a") is None
    assert table.expire(now=100.0) == []


def test_bad_grants_are_refused():
    table = LeaseTable(FakeClock())
    table.grant("a", [1], ttl=1.0)
    with pytest.raises(ValueError, match="already"):
        table.grant("a", [2], ttl=1.0)
    with pytest.raises(ValueError, match="twice"):
        table.grant("b", [2, 2], ttl=1.0)
    with pytest.raises(ValueError, match="positive"):
        table.grant("c", [3], ttl=0.0)


class LeaseMachine(RuleBasedStateMachine):
    """Random grants, renewals, releases, clock steps and sweeps against a model."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.table = LeaseTable(self.clock)
        self.granted: Counter[int] = Counter()
        self.returned: Counter[int] = Counter()
        self.live: set[str] = set()
        self.next_id = 0

    @rule(blocks=st.sets(st.integers(0, 31), max_size=6), ttl=st.floats(0.1, 10.0))
    def grant(self, blocks, ttl):
        request_id = f"r{self.next_id}"
        self.next_id += 1
        self.table.grant(request_id, blocks, ttl)
        self.granted.update(blocks)
        self.live.add(request_id)

    @precondition(lambda self: self.next_id > 0)
    @rule(data=st.data())
    def renew(self, data):
        request_id = f"r{data.draw(st.integers(0, self.next_id - 1))}"
        lease = self.table.get(request_id)
        renewed = self.table.renew(request_id)
        assert renewed == (lease is not None and lease.expires_at > self.clock.now)

    @precondition(lambda self: self.next_id > 0)
    @rule(data=st.data())
    def release(self, data):
        request_id = f"r{data.draw(st.integers(0, self.next_id - 1))}"
        blocks = self.table.release(request_id)
        assert (blocks is not None) == (request_id in self.live)
        self.live.discard(request_id)
        self.returned.update(blocks or [])

    @rule(dt=st.floats(0.0, 5.0))
    def advance(self, dt):
        self.clock.now += dt

    @rule()
    def expire(self):
        for lease in self.table.expire():
            assert lease.expires_at <= self.clock.now
            self.live.remove(lease.request_id)  # raises if returned twice
            self.returned.update(lease.block_ids)

    @invariant()
    def nothing_lost_or_doubled(self):
        held = Counter(b for r in self.live for b in self.table.get(r).block_ids)
        assert self.returned + held == self.granted
        assert self.table.num_pinned_blocks == sum(held.values())

    def teardown(self):
        for lease in self.table.expire(now=float("inf")):
            self.returned.update(lease.block_ids)
        assert self.returned == self.granted


LeaseMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestLeaseTable = LeaseMachine.TestCase
