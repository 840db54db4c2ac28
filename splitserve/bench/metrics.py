"""Serving metrics from per-request records, defined as `vllm bench serve` defines them.

Per request (successful requests only; failed ones are counted, never averaged in):
- TTFT: send -> first chunk carrying a token.
- E2EL: send -> last chunk carrying a token. vLLM takes the last content chunk, not the
  end of the stream, so a trailing Final message does not add to latency.
- TPOT: (E2EL - TTFT) / (output_tokens - 1), only for requests with more than one
  output token. Output tokens are the server's ``usage.completion_tokens`` when it
  reported them (vLLM prefers usage too), else the streamed count.
- ITL: every gap between consecutive chunks, pooled across requests. Like vLLM, a chunk
  carrying k tokens contributes ONE gap (the wait before it), not k gaps of 1/k each. So
  with multi-token chunks mean ITL exceeds TPOT; TPOT stays per token, and for each
  request sum(ITL) == (E2EL - TTFT) == TPOT * (output_tokens - 1).

Over the run (``duration_s`` from the first send scheduled to the last response):
request, output-token and total-token throughput over completed requests, and goodput:
completed requests per second meeting every given SLO (metric <= SLO, inclusive; a
request with one output token counts TPOT as 0, as vLLM does).

Deviations from vLLM, all where it would print a misleading number: a metric with no
samples is None (vLLM prints 0), and the peak output tokens/s counts the tokens of each
chunk (vLLM counts one per chunk; the two agree when every chunk has one token). vLLM's
"peak concurrent requests" counts every request that touches the busiest one-second
bucket, so it can exceed --max-concurrency; it is kept under its vLLM name, and
``max_in_flight_requests`` adds the exact peak of requests open at one instant.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitserve.bench.records import RequestRecord

MS_PER_S = 1000.0
SLO_NAMES = ("ttft", "tpot", "e2el")
METRIC_NAMES = ("ttft", "tpot", "itl", "e2el")


def ttft(record: RequestRecord) -> float:
    return record.chunk_times[0] - record.send_time


def e2el(record: RequestRecord) -> float:
    return record.chunk_times[-1] - record.send_time


def output_tokens(record: RequestRecord) -> int:
    if record.usage is not None:
        return record.usage.completion_tokens
    return record.num_streamed_tokens


def input_tokens(record: RequestRecord) -> int:
    if record.usage is not None:
        return record.usage.prompt_tokens
    return record.prompt_len or 0


def tpot(record: RequestRecord) -> float | None:
    """None for requests with at most one output token: they have no decode phase."""
    n = output_tokens(record)
    if n <= 1:
        return None
    return (e2el(record) - ttft(record)) / (n - 1)


def itls(record: RequestRecord) -> list[float]:
    times = record.chunk_times
    return [b - a for a, b in zip(times, times[1:])]


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency metric, in milliseconds. Percentiles use numpy's default
    linear interpolation, as vLLM does."""

    count: int
    mean: float
    std: float
    median: float
    percentiles: tuple[tuple[float, float], ...]  # (percentile, value)

    def percentile(self, p: float) -> float:
        return dict(self.percentiles)[p]


def summarize(values_s: Sequence[float], percentiles: Sequence[float]) -> Distribution | None:
    if not values_s:
        return None
    ms = np.asarray(values_s, dtype=np.float64) * MS_PER_S
    return Distribution(
        count=len(ms),
        mean=float(np.mean(ms)),
        std=float(np.std(ms)),
        median=float(np.median(ms)),
        percentiles=tuple((float(p), float(np.percentile(ms, p))) for p in percentiles),
    )


def percentile_word(p: float) -> str:
    """99 -> "99", 99.9 -> "99.9", as vLLM names its keys (p99_ttft_ms)."""
    return str(int(p)) if int(p) == p else str(p)


def parse_goodput(pairs: Iterable[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:25"]`` -> ``{"ttft": 500.0, "tpot": 25.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        if not sep:
            raise ValueError(f"goodput SLO {pair!r} is not KEY:MILLISECONDS")
        if name not in SLO_NAMES:
            raise ValueError(f"goodput SLO name {name!r} is not one of {SLO_NAMES}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {pair!r}: {value!r} is not a number") from None
        if not ms >= 0:
            raise ValueError(f"goodput SLO {pair!r} must be non-negative")
        slos[name] = ms
    return slos


def meets_slos(record: RequestRecord, slos_ms: Mapping[str, float]) -> bool:
    if not record.success:
        return False
    measured = {"ttft": ttft(record), "tpot": tpot(record) or 0.0, "e2el": e2el(record)}
    return all(measured[name] <= slo / MS_PER_S for name, slo in slos_ms.items())


@dataclass(frozen=True)
class BenchmarkMetrics:
    """One sweep point's results. Latencies in ms, throughputs per second of duration."""

    num_requests: int
    completed: int
    failed: int
    failed_by_code: dict[str, int]
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    request_goodput: float | None  # None when no SLO was given
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int  # vLLM's: requests touching the busiest one-second bucket
    max_in_flight_requests: int  # exact: most requests between send and stream end at once
    ttft_ms: Distribution | None
    tpot_ms: Distribution | None
    itl_ms: Distribution | None
    e2el_ms: Distribution | None

    def distribution(self, name: str) -> Distribution | None:
        return getattr(self, f"{name}_ms")

    def to_dict(self) -> dict[str, Any]:
        """Flat keys named as vLLM's result JSON names them (mean_ttft_ms, p99_itl_ms, ...)."""
        out: dict[str, Any] = {
            "num_requests": self.num_requests,
            "completed": self.completed,
            "failed": self.failed,
            "failed_by_code": dict(self.failed_by_code),
            "duration": self.duration_s,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "request_goodput": self.request_goodput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "max_output_tokens_per_s": self.max_output_tokens_per_s,
            "max_concurrent_requests": self.max_concurrent_requests,
            "max_in_flight_requests": self.max_in_flight_requests,
        }
        for name in METRIC_NAMES:
            dist = self.distribution(name)
            out[f"num_{name}_samples"] = dist.count if dist else 0
            out[f"mean_{name}_ms"] = dist.mean if dist else None
            out[f"median_{name}_ms"] = dist.median if dist else None
            out[f"std_{name}_ms"] = dist.std if dist else None
            for p, value in dist.percentiles if dist else ():
                out[f"p{percentile_word(p)}_{name}_ms"] = value
        return out


def _peaks(records: Sequence[RequestRecord]) -> tuple[float, int]:
    """vLLM's peak output tokens/s and peak concurrent requests: one-second buckets from
    the earliest send; a request counts as concurrent in every bucket it touches."""
    if not records:
        return 0.0, 0
    start = min(r.send_time for r in records)
    end = max(r.send_time + e2el(r) for r in records)
    num_buckets = int(math.ceil(end - start)) + 1
    tokens = np.zeros(num_buckets)
    concurrent = np.zeros(num_buckets, dtype=np.int64)
    for r in records:
        for t, n in zip(r.chunk_times, r.chunk_num_tokens):
            tokens[int(t - start)] += n
        concurrent[int(r.send_time - start) : int(r.send_time + e2el(r) - start) + 1] += 1
    return float(tokens.max()), int(concurrent.max())


def max_in_flight(records: Sequence[RequestRecord]) -> int:
    """The most requests, failed ones included, open at one instant (send to stream end).
    Unlike vLLM's bucketed count this is bounded by --max-concurrency."""
    # An end sorts before a send at the same instant: a slot handed over is not two.
    events = sorted([(r.send_time, 1) for r in records] + [(r.end_time, -1) for r in records])
    current = peak = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def compute_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    percentiles: Sequence[float] = (90.0, 99.0),
    slos_ms: Mapping[str, float] | None = None,
) -> BenchmarkMetrics:
    if not duration_s > 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    if any(not 0 <= p <= 100 for p in percentiles):
        raise ValueError(f"percentiles must lie in [0, 100], got {list(percentiles)}")
    if slos_ms and set(slos_ms) - set(SLO_NAMES):
        raise ValueError(f"SLO names must be among {SLO_NAMES}, got {sorted(slos_ms)}")

    ok = [r for r in records if r.success]
    failed_by_code = Counter(r.error_code for r in records if not r.success)
    total_input = sum(input_tokens(r) for r in ok)
    total_output = sum(output_tokens(r) for r in ok)
    goodput = None
    if slos_ms:
        goodput = sum(meets_slos(r, slos_ms) for r in ok) / duration_s
    max_tokens_per_s, max_concurrent = _peaks(ok)
    tpots = [t for t in (tpot(r) for r in ok) if t is not None]
    return BenchmarkMetrics(
        num_requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        failed_by_code=dict(sorted(failed_by_code.items())),
        duration_s=duration_s,
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        request_throughput=len(ok) / duration_s,
        request_goodput=goodput,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        max_output_tokens_per_s=max_tokens_per_s,
        max_concurrent_requests=max_concurrent,
        max_in_flight_requests=max_in_flight(records),
        ttft_ms=summarize([ttft(r) for r in ok], percentiles),
        tpot_ms=summarize(tpots, percentiles),
        itl_ms=summarize([gap for r in ok for gap in itls(r)], percentiles),
        e2el_ms=summarize([e2el(r) for r in ok], percentiles),
    )
