"""Where samples come from: the pods' own /metrics, or a Prometheus server's HTTP API."""
from __future__ import annotations

import json
import logging
import math
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

from splitserve.planner.decision import PoolSample
from splitserve.planner.metrics import ITL, KV_FREE, KV_USED, RUNNING, TTFT, WAITING, PodMetrics, PoolAggregator, parse_pod_metrics

log = logging.getLogger(__name__)


class PodTarget(NamedTuple):
    name: str
    uid: str
    ip: str
    port: int

    @property
    def metrics_url(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"http://{host}:{self.port}/metrics"


def http_get(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (cluster-internal URLs)
        return response.read().decode()


class PodScrapeSource:
    """Scrapes every ready pod of a pool; pods that fail to answer are left out of the sample."""

    def __init__(self, list_targets: Callable[[], list[PodTarget]], *, timeout_s: float = 3.0,
                 clock: Callable[[], float] = time.monotonic, fetch: Callable[[str, float], str] = http_get):
        self._list_targets = list_targets
        self._timeout_s = timeout_s
        self._clock = clock
        self._fetch = fetch
        self._aggregator = PoolAggregator()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="scrape")

    def _scrape(self, target: PodTarget) -> PodMetrics | None:
        try:
            return parse_pod_metrics(self._fetch(target.metrics_url, self._timeout_s))
        except Exception as e:  # one pod's failure must not hide the others
            log.warning("scraping %s at %s failed: %s", target.name, target.metrics_url, e)
            return None

    def collect(self) -> PoolSample | None:
        targets = self._list_targets()
        results = list(self._pool.map(self._scrape, targets))
        pods = {f"{t.name}/{t.uid}": m for t, m in zip(targets, results) if m is not None}
        return self._aggregator.aggregate(pods, self._clock())


class PrometheusSource:
    """Asks Prometheus (``/api/v1/query``) for a pool's signals. ``selector`` is a label
    matcher such as ``namespace="llm",pod=~"rel-splitserve-prefill-.*"``."""

    def __init__(self, base_url: str, selector: str, *, window: str = "2m", timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, fetch: Callable[[str, float], str] = http_get):
        self._base_url = base_url.rstrip("/")
        self._selector = selector
        self._window = window
        self._timeout_s = timeout_s
        self._clock = clock
        self._fetch = fetch

    def _query(self, promql: str) -> float | None:
        url = f"{self._base_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        body = json.loads(self._fetch(url, self._timeout_s))
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus: {body.get('error', body)}")
        result = body["data"]["result"]
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if math.isnan(value) or math.isinf(value) else value

    def _quantile(self, histogram: str) -> str:
        return (f"histogram_quantile(0.9, sum by (le) "
                f"(rate({histogram}_bucket{{{self._selector}}}[{self._window}])))")

    def collect(self) -> PoolSample | None:
        sel = self._selector
        try:
            # One series per pod (instance), whatever other labels the gauge carries.
            ready = self._query(f"count(count by (instance) ({WAITING}{{{sel}}}))")
            if not ready:
                return None
            used = self._query(f"sum({KV_USED}{{{sel}}})")
            free = self._query(f"sum({KV_FREE}{{{sel}}})")
            return PoolSample(
                time=self._clock(),
                num_ready_replicas=int(ready),
                num_waiting_requests=self._query(f"sum({WAITING}{{{sel}}})") or 0.0,
                num_running_requests=self._query(f"sum({RUNNING}{{{sel}}})") or 0.0,
                kv_cache_utilization=used / (used + free) if used is not None and free is not None and used + free > 0 else None,
                ttft_p90_seconds=self._query(self._quantile(TTFT)),
                itl_p90_seconds=self._query(self._quantile(ITL)),
            )
        except Exception as e:
            log.warning("querying prometheus at %s failed: %s", self._base_url, e)
            return None
