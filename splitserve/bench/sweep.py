"""Sweep points (request rate x max concurrency) and running them one after another
against the same prompts, so the points differ only in load."""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from splitserve.bench.datasets import BenchRequest
from splitserve.bench.loadgen import LoadResult, LoadSpec, RequestFn, run_load
from splitserve.bench.metrics import BenchmarkMetrics, compute_metrics


@dataclass(frozen=True)
class SweepPoint:
    request_rate: float  # math.inf: all at once
    max_concurrency: int | None  # None: unbounded

    def label(self) -> str:
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        conc = "" if self.max_concurrency is None else f" conc={self.max_concurrency}"
        return f"rate={rate}{conc}"


@dataclass(frozen=True)
class PointResult:
    point: SweepPoint
    load: LoadResult
    metrics: BenchmarkMetrics


def sweep_points(rates: Sequence[float], concurrencies: Sequence[int | None]) -> list[SweepPoint]:
    """Every combination, rates outermost, in the order given."""
    return [SweepPoint(r, c) for r, c in itertools.product(rates, concurrencies)]


async def run_point(
    point: SweepPoint,
    requests: Sequence[BenchRequest],
    send: RequestFn,
    burstiness: float,
    arrival_seed: np.random.SeedSequence,
    percentiles: Sequence[float],
    slos_ms: Mapping[str, float],
    progress: bool,
) -> PointResult:
    # Every point draws its arrivals from the same seed: at different rates the gaps
    # keep their shape and only scale.
    rng = np.random.default_rng(arrival_seed)
    spec = LoadSpec(point.request_rate, burstiness, point.max_concurrency)
    load = await run_load(requests, send, spec, rng, progress=progress, description=point.label())
    metrics = compute_metrics(load.records, load.duration_s, percentiles, slos_ms)
    return PointResult(point, load, metrics)
