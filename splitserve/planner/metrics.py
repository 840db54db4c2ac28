"""From the workers' Prometheus text to one ``PoolSample`` per pool.

Gauges are summed over pods. Latency percentiles come from the histograms' growth since the
previous scrape of the same pod (a restarted pod's counters start over), summed over pods,
the way ``histogram_quantile(0.9, sum by (le) (rate(...)))`` does it in Prometheus.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from prometheus_client.parser import text_string_to_metric_families

from splitserve.planner.decision import PoolSample

WAITING = "splitserve_waiting_requests"
RUNNING = "splitserve_running_requests"
KV_USED = "splitserve_kv_blocks_used"
KV_FREE = "splitserve_kv_blocks_free"
TTFT = "splitserve_time_to_first_token_seconds"
ITL = "splitserve_inter_token_latency_seconds"

Buckets = tuple[tuple[float, float], ...]  # ((upper bound le, cumulative count), ...) by le


@dataclass(frozen=True)
class PodMetrics:
    """The series the planner reads from one pod, summed over their labels."""

    gauges: Mapping[str, float]
    histograms: Mapping[str, Buckets]


def parse_pod_metrics(text: str) -> PodMetrics:
    gauges: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name in (WAITING, RUNNING, KV_USED, KV_FREE):
            gauges[family.name] = sum(s.value for s in family.samples)
        elif family.name in (TTFT, ITL):
            by_le = buckets.setdefault(family.name, {})
            for s in family.samples:
                if s.name == family.name + "_bucket":
                    le = float(s.labels["le"])
                    by_le[le] = by_le.get(le, 0.0) + s.value
    return PodMetrics(gauges, {name: tuple(sorted(b.items())) for name, b in buckets.items()})


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """Prometheus' estimate: linear inside the bucket that holds the q-th observation."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_le  # the top bucket has no upper bound to interpolate to
            if count == lower_count:
                return le
            return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
        lower_le, lower_count = le, count
    return buckets[-1][0]


def _growth(now: Buckets, before: Buckets | None) -> dict[float, float]:
    prev = dict(before or ())
    if any(count < prev.get(le, 0.0) for le, count in now):
        prev = {}  # counter reset: the pod restarted
    return {le: count - prev.get(le, 0.0) for le, count in now}


class PoolAggregator:
    """Turns each round of per-pod scrapes into a ``PoolSample``; remembers the last round's
    histograms so percentiles cover only the time since."""

    def __init__(self, quantile: float = 0.9):
        self._quantile = quantile
        self._previous: dict[str, Mapping[str, Buckets]] = {}

    def aggregate(self, pods: Mapping[str, PodMetrics], now: float) -> PoolSample | None:
        """``pods`` maps a pod's identity (name and uid) to what it served; None when empty."""
        if not pods:
            return None
        total = lambda name: sum(p.gauges.get(name, 0.0) for p in pods.values())  # noqa: E731
        have = lambda name: any(name in p.gauges for p in pods.values())  # noqa: E731
        used, free = total(KV_USED), total(KV_FREE)
        kv = used / (used + free) if have(KV_USED) and have(KV_FREE) and used + free > 0 else None
        percentiles = {}
        for name in (TTFT, ITL):
            summed: dict[float, float] = {}
            for key, pod in pods.items():
                if name in pod.histograms and key in self._previous:
                    for le, n in _growth(pod.histograms[name], self._previous[key].get(name)).items():
                        summed[le] = summed.get(le, 0.0) + n
            percentiles[name] = histogram_quantile(self._quantile, tuple(sorted(summed.items())))
        self._previous = {key: pod.histograms for key, pod in pods.items()}
        if not have(WAITING):
            return None  # not a splitserve worker, or it serves no metrics yet
        return PoolSample(
            time=now,
            num_ready_replicas=len(pods),
            num_waiting_requests=total(WAITING),
            num_running_requests=total(RUNNING),
            kv_cache_utilization=kv,
            ttft_p90_seconds=percentiles[TTFT],
            itl_p90_seconds=percentiles[ITL],
        )
