"""Parsing the workers' Prometheus text and turning scrapes into pool samples."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitserve.planner.metrics import ITL, KV_FREE, KV_USED, TTFT, WAITING, PoolAggregator, histogram_quantile, parse_pod_metrics
from splitserve.planner.sources import PrometheusSource

RECORDED = (Path(__file__).parent / "data" / "decode_worker_metrics.txt").read_text()


def test_parse_recorded_worker_metrics():
    m = parse_pod_metrics(RECORDED)
    assert m.gauges[WAITING] == 3 and m.gauges[KV_USED] == 1450 and m.gauges[KV_FREE] == 598
    itl = dict(m.histograms[ITL])
    assert itl[0.05] == 40 and itl[0.1] == 90 and itl[float("inf")] == 100
    assert dict(m.histograms[TTFT])[0.5] == 7
    # Counters and other histograms are not what the planner reads.
    assert "splitserve_kv_transfer_seconds" not in m.histograms


def test_gauges_are_summed_over_labels():
    text = ('# TYPE splitserve_waiting_requests gauge\n'
            'splitserve_waiting_requests{role="prefill",priority="high"} 2\n'
            'splitserve_waiting_requests{role="prefill",priority="low"} 5\n')
    assert parse_pod_metrics(text).gauges[WAITING] == 7


def test_histogram_quantile_matches_prometheus():
    buckets = ((0.05, 40.0), (0.1, 90.0), (0.25, 100.0), (float("inf"), 100.0))
    # Rank 90 of 100 falls at the top of the 0.05-0.1 bucket; rank 50 a fifth into it.
    assert histogram_quantile(0.9, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.06)
    assert histogram_quantile(0.9, ((1.0, 0.0), (float("inf"), 0.0))) is None
    assert histogram_quantile(0.99, ((1.0, 1.0), (float("inf"), 10.0))) == 1.0  # +Inf bucket: its lower bound


def _worker_text(waiting: float, used: float, free: float, itl_counts: tuple[float, float, float]) -> str:
    a, b, c = itl_counts
    return (f"# TYPE splitserve_waiting_requests gauge\nsplitserve_waiting_requests{{role=\"decode\"}} {waiting}\n"
            f"# TYPE splitserve_kv_blocks_used gauge\nsplitserve_kv_blocks_used {used}\n"
            f"# TYPE splitserve_kv_blocks_free gauge\nsplitserve_kv_blocks_free {free}\n"
            "# TYPE splitserve_inter_token_latency_seconds histogram\n"
            f'splitserve_inter_token_latency_seconds_bucket{{le="0.05"}} {a}\n'
            f'splitserve_inter_token_latency_seconds_bucket{{le="0.1"}} {b}\n'
            f'splitserve_inter_token_latency_seconds_bucket{{le="+Inf"}} {c}\n'
            f"splitserve_inter_token_latency_seconds_count {c}\nsplitserve_inter_token_latency_seconds_sum 1.0\n")


def test_aggregate_sums_pods_and_uses_histogram_growth_only():
    agg = PoolAggregator()
    first = {"a/1": parse_pod_metrics(_worker_text(1, 100, 100, (1000, 1000, 1000))),
             "b/2": parse_pod_metrics(_worker_text(2, 300, 100, (0, 0, 0)))}
    s = agg.aggregate(first, now=5.0)
    assert s.num_ready_replicas == 2 and s.num_waiting_requests == 3
    assert s.kv_cache_utilization == pytest.approx(400 / 600)
    assert s.itl_p90_seconds is None  # no earlier scrape to compare with
    # Since then: pod a saw 10 slow tokens, pod b 90 fast ones. The 1000 old fast tokens
    # of pod a must not hide the recent slow ones.
    second = {"a/1": parse_pod_metrics(_worker_text(1, 100, 100, (1000, 1000, 1010))),
              "b/2": parse_pod_metrics(_worker_text(2, 300, 100, (90, 90, 90)))}
    s = agg.aggregate(second, now=20.0)
    assert s.time == 20.0
    assert s.itl_p90_seconds == pytest.approx(0.05)  # rank 90 of 100: the last fast token
    third = {"a/1": parse_pod_metrics(_worker_text(1, 100, 100, (1000, 1000, 1050))),
             "b/2": parse_pod_metrics(_worker_text(2, 300, 100, (90, 90, 90)))}
    assert agg.aggregate(third, now=35.0).itl_p90_seconds == 0.1  # all 40 new ones in +Inf


def test_restarted_pod_counts_from_zero():
    agg = PoolAggregator()
    agg.aggregate({"a/1": parse_pod_metrics(_worker_text(0, 1, 1, (500, 600, 600)))}, now=0)
    s = agg.aggregate({"a/1": parse_pod_metrics(_worker_text(0, 1, 1, (10, 10, 10)))}, now=15)
    assert s.itl_p90_seconds == pytest.approx(0.045)  # the 10 new tokens, not a negative delta


def test_no_pods_or_foreign_metrics_give_no_sample():
    agg = PoolAggregator()
    assert agg.aggregate({}, now=0) is None
    assert agg.aggregate({"x/1": parse_pod_metrics("# TYPE up gauge\nup 1\n")}, now=0) is None


class FakePrometheus:
    """Answers /api/v1/query like Prometheus does, from a table of PromQL -> value."""

    def __init__(self, answers: dict[str, float | None]):
        self.answers = answers
        self.queries: list[str] = []

    def __call__(self, url: str, timeout_s: float) -> str:
        from urllib.parse import parse_qs, urlparse

        query = parse_qs(urlparse(url).query)["query"][0]
        self.queries.append(query)
        for fragment, value in self.answers.items():
            if query.startswith(fragment):
                result = [] if value is None else [{"metric": {}, "value": [1.0, str(value)]}]
                return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})
        return json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}})


def test_prometheus_source_builds_a_sample():
    fake = FakePrometheus({"count(": 2, "sum(splitserve_waiting_requests": 9, "sum(splitserve_running_requests": 40,
                           "sum(splitserve_kv_blocks_used": 300, "sum(splitserve_kv_blocks_free": 100,
                           f"histogram_quantile(0.9, sum by (le) (rate({TTFT}": 1.5,
                           f"histogram_quantile(0.9, sum by (le) (rate({ITL}": "NaN"})
    src = PrometheusSource("http://prom:9090/", 'namespace="llm",pod=~"p-.*"', clock=lambda: 7.0, fetch=fake)
    s = src.collect()
    assert (s.time, s.num_ready_replicas, s.num_waiting_requests, s.num_running_requests) == (7.0, 2, 9, 40)
    assert s.kv_cache_utilization == 0.75 and s.ttft_p90_seconds == 1.5 and s.itl_p90_seconds is None
    assert all('{namespace="llm",pod=~"p-.*"}' in q for q in fake.queries)


def test_prometheus_source_without_pods_or_reachable_server_gives_nothing():
    assert PrometheusSource("http://prom", "x=\"y\"", fetch=FakePrometheus({"count(": None})).collect() is None

    def down(url, timeout_s):
        raise OSError("connection refused")

    assert PrometheusSource("http://prom", "x=\"y\"", fetch=down).collect() is None
