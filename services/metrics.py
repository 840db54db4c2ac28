"""Prometheus metrics of one service, in a registry of its own (no process-global state)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServiceMetrics:
    """The names the chart's ServiceMonitor and the planner read; ``role`` labels the pool."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("splitserve_requests", "Requests by outcome", ["role", "outcome"], registry=r)
        self.errors = Counter("splitserve_errors", "Errors by kind", ["role", "kind"], registry=r)
        self.ttft = Histogram("splitserve_time_to_first_token_seconds", "Time to first token", ["role"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("splitserve_inter_token_latency_seconds", "Gap between tokens", ["role"], buckets=LATENCY_BUCKETS, registry=r)
        self.waiting = Gauge("splitserve_waiting_requests", "Requests queued", ["role"], registry=r)
        self.running = Gauge("splitserve_running_requests", "Requests in the running batch", ["role"], registry=r)
        self.kv_used = Gauge("splitserve_kv_blocks_used", "KV blocks in use", ["role"], registry=r)
        self.kv_free = Gauge("splitserve_kv_blocks_free", "KV blocks free (cached ones included)", ["role"], registry=r)
        self.prompt_tokens = Counter("splitserve_prompt_tokens", "Prompt tokens seen", ["role"], registry=r)
        self.prefix_hits = Counter("splitserve_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", ["role"], registry=r)
        self.preemptions = Counter("splitserve_preemptions", "Running requests preempted for KV blocks (recomputed later)", ["role"], registry=r)
        self.discarded_rows = Counter(
            "splitserve_discarded_rows", "Rows computed for requests that had stopped meanwhile (async scheduling)", ["role"], registry=r
        )
        self.kv_bytes = Counter("splitserve_kv_transfer_bytes", "KV bytes moved between workers", ["role"], registry=r)
        self.routing = Counter("splitserve_routing_decisions", "Routing decisions by pool, policy and reason", ["role", "policy", "reason"], registry=r)
        self.kv_seconds = Histogram("splitserve_kv_transfer_seconds", "KV transfer time", ["role"], buckets=LATENCY_BUCKETS, registry=r)

    def outcome(self, outcome: str) -> None:
        self.requests.labels(self.role, outcome).inc()

    def error(self, kind: str) -> None:
        self.errors.labels(self.role, kind).inc()

    def observe_engine(self, stats) -> None:
        self.waiting.labels(self.role).set(stats.num_waiting)
        self.running.labels(self.role).set(stats.num_running)
        self.kv_used.labels(self.role).set(stats.num_total_blocks - stats.num_free_blocks)
        self.kv_free.labels(self.role).set(stats.num_free_blocks)
