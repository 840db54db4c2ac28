"""The arrival process and the concurrency cap, driven with an injected request
function instead of a network call."""
from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from splitserve.bench.datasets import BenchRequest, RandomDataset, random_requests
from splitserve.bench.loadgen import LoadSpec, arrival_offsets, run_load
from splitserve.bench.records import RequestRecord, Usage


def requests(n: int) -> list[BenchRequest]:
    return random_requests(RandomDataset(n, 4, 3), 100, np.random.default_rng(0))


def gaps(offsets: np.ndarray) -> np.ndarray:
    return np.diff(offsets, prepend=0.0)


def test_infinite_rate_sends_everything_at_once() -> None:
    assert not arrival_offsets(50, math.inf, 1.0, np.random.default_rng(0)).any()


@pytest.mark.parametrize("burstiness, cv", [(1.0, 1.0), (4.0, 0.5), (0.25, 2.0)])
def test_gamma_gaps_have_the_right_mean_and_spread(burstiness: float, cv: float) -> None:
    rate = 8.0
    offsets = arrival_offsets(4000, rate, burstiness, np.random.default_rng(42))
    g = gaps(offsets)
    assert (g >= 0).all() and (np.diff(offsets) >= 0).all()
    # Rescaled as vLLM does: the last request goes out at exactly n / rate ...
    assert offsets[-1] == pytest.approx(4000 / rate)
    assert g.mean() == pytest.approx(1 / rate)
    # ... and the shape stays gamma: coefficient of variation 1/sqrt(burstiness).
    assert g.std() / g.mean() == pytest.approx(cv, rel=0.1)
    if burstiness == 1.0:  # exponential: P(gap < mean) = 1 - 1/e
        assert (g < 1 / rate).mean() == pytest.approx(1 - math.exp(-1), abs=0.03)


def test_infinite_burstiness_gives_even_gaps_and_seeds_repeat() -> None:
    assert gaps(arrival_offsets(10, 5.0, math.inf, np.random.default_rng(0))) == pytest.approx([0.2] * 10)
    a = arrival_offsets(100, 3.0, 1.0, np.random.default_rng(9))
    assert (a == arrival_offsets(100, 3.0, 1.0, np.random.default_rng(9))).all()
    assert (a != arrival_offsets(100, 3.0, 1.0, np.random.default_rng(10))).any()


class FakeServer:
    """Answers after ``latency`` seconds with one token per call, and counts how many
    calls are in flight at once."""

    def __init__(self, latency: float, fail_index: int | None = None) -> None:
        self.latency = latency
        self.fail_index = fail_index
        self.in_flight = 0
        self.max_in_flight = 0

    async def send(self, request: BenchRequest) -> RequestRecord:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            start = time.perf_counter()
            await asyncio.sleep(self.latency)
            if request.index == self.fail_index:
                raise ConnectionError("the fake server fell over")
            now = time.perf_counter()
            return RequestRecord(
                index=request.index, request_id=str(request.index), send_time=start, chunk_times=(now,),
                chunk_num_tokens=(1,), end_time=now, prompt_len=request.prompt_len, max_tokens=1,
                usage=Usage(request.prompt_len, 1, 0), finish_reason="length", error_code=None,
            )
        finally:
            self.in_flight -= 1


def test_max_concurrency_is_respected() -> None:
    server = FakeServer(latency=0.02)
    result = asyncio.run(run_load(requests(12), server.send, LoadSpec(math.inf, max_concurrency=3),
                                  np.random.default_rng(0), progress=False))
    assert server.max_in_flight == 3
    assert [r.index for r in result.records] == list(range(12))
    # 12 requests, 3 at a time, 20 ms each: at least four rounds.
    assert result.duration_s >= 4 * 0.02
    assert all(r.success for r in result.records)


def test_unbounded_infinite_rate_sends_all_at_once() -> None:
    server = FakeServer(latency=0.05)
    result = asyncio.run(run_load(requests(20), server.send, LoadSpec(math.inf), np.random.default_rng(0), progress=False))
    assert server.max_in_flight == 20
    assert max(r.send_time for r in result.records) < 0.04  # nobody waited for anybody


def test_requests_go_out_on_schedule() -> None:
    rate, n = 200.0, 20
    server = FakeServer(latency=0.001)
    result = asyncio.run(run_load(requests(n), server.send, LoadSpec(rate), np.random.default_rng(5), progress=False))
    expected = arrival_offsets(n, rate, 1.0, np.random.default_rng(5))
    sends = np.array([r.send_time for r in result.records])
    assert (sends >= expected - 1e-3).all()  # never early; times are from the run's start
    assert result.duration_s >= n / rate


def test_a_raising_request_function_becomes_a_failed_record() -> None:
    server = FakeServer(latency=0.001, fail_index=2)
    result = asyncio.run(run_load(requests(5), server.send, LoadSpec(math.inf), np.random.default_rng(0), progress=False))
    assert len(result.records) == 5
    bad = result.records[2]
    assert bad.error_code == "CLIENT_EXCEPTION" and "fell over" in bad.error_message
    assert sum(r.success for r in result.records) == 4


@pytest.mark.parametrize("kwargs", [dict(request_rate=0.0), dict(request_rate=1.0, burstiness=0.0),
                                    dict(request_rate=1.0, max_concurrency=0)])
def test_bad_load_specs_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LoadSpec(**kwargs)
