"""The load generator: sends requests on an arrival schedule under a concurrency cap.

Arrivals follow vLLM's ``get_request``: gamma-distributed gaps with shape
``burstiness`` and mean ``1 / request_rate`` (burstiness 1 is a Poisson process; lower
is burstier, higher more regular), all at time 0 for an infinite rate. As in vLLM, the
schedule is drawn up front and rescaled so the last request goes out at exactly
``num_requests / request_rate``, and ``max_concurrency`` holds requests back at a
semaphore *after* they arrive: the send time (and so TTFT) starts when a request gets a
slot, and the achieved rate falls below the configured one when the server is slower.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from splitserve.bench.datasets import BenchRequest
from splitserve.bench.records import RequestRecord

# Sends one request and reports what happened; must time itself with the same clock
# the load generator uses (time.perf_counter).
RequestFn = Callable[[BenchRequest], Awaitable[RequestRecord]]


@dataclass(frozen=True)
class LoadSpec:
    request_rate: float  # requests/s; math.inf sends everything at once
    burstiness: float = 1.0
    max_concurrency: int | None = None  # None: unbounded

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be positive, got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be positive, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")


@dataclass(frozen=True)
class LoadResult:
    records: tuple[RequestRecord, ...]  # in dataset order; times from the run's start
    duration_s: float  # first send scheduled -> last response in


def arrival_offsets(
    num_requests: int, request_rate: float, burstiness: float, rng: np.random.Generator
) -> np.ndarray:
    """Seconds from the start at which each request arrives. [num_requests]"""
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    if math.isinf(burstiness):
        gaps = np.full(num_requests, 1.0 / request_rate)
    else:
        theta = 1.0 / (request_rate * burstiness)
        gaps = rng.gamma(shape=burstiness, scale=theta, size=num_requests)
    offsets = np.cumsum(gaps)
    # Random gaps sum to within a few percent of num/rate; rescaling removes that drift
    # so throughput at a given rate does not depend on the seed (vLLM does the same).
    return offsets * (num_requests / request_rate) / offsets[-1]


def _client_failure(request: BenchRequest, started: float, error: BaseException, now: float) -> RequestRecord:
    return RequestRecord(
        index=request.index,
        request_id="",
        send_time=started,
        chunk_times=(),
        chunk_num_tokens=(),
        end_time=now,
        prompt_len=request.prompt_len,
        max_tokens=request.max_tokens,
        usage=None,
        finish_reason=None,
        error_code="CLIENT_EXCEPTION",
        error_message=f"{type(error).__name__}: {error}",
        injected_invalid=request.injected_invalid,
    )


async def run_load(
    requests: Sequence[BenchRequest],
    send: RequestFn,
    spec: LoadSpec,
    rng: np.random.Generator,
    progress: bool = True,
    description: str = "",
) -> LoadResult:
    """Send every request on the schedule and return one record per request, failures
    included: an exception from ``send`` becomes a CLIENT_EXCEPTION record."""
    if not requests:
        raise ValueError("no requests to send")
    offsets = arrival_offsets(len(requests), spec.request_rate, spec.burstiness, rng)
    limiter = (
        asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else contextlib.nullcontext()
    )
    bar = tqdm(total=len(requests), disable=not progress, desc=description, unit="req")

    async def one(request: BenchRequest) -> RequestRecord:
        async with limiter:
            started = time.perf_counter()
            try:
                record = await send(request)
            except Exception as e:  # noqa: BLE001 - every failure must become a record
                record = _client_failure(request, started, e, time.perf_counter())
        bar.update(1)
        return record

    start = time.perf_counter()
    tasks = []
    try:
        for request, offset in zip(requests, offsets):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(request)))
        records = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        bar.close()
    duration = time.perf_counter() - start
    return LoadResult(records=tuple(r.shifted(-start) for r in records), duration_s=duration)
