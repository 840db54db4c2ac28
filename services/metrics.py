"""Prometheus metrics of one service, in a registry of its own (no process-global state).

Beside splitserve's own series (``splitserve_*``, labelled by ``role``), each service exports
vLLM's names for what it measures (``vllm:*``, labelled by ``model_name`` and ``role``), so
vLLM's Grafana dashboards, KEDA triggers on ``vllm:num_requests_waiting`` and the Gateway API
Inference Extension's endpoint picker read splitserve as they read vLLM. Each vLLM name comes
from one kind of process only, so a sum over every pod counts each event once: the workers
export the engine's (queues, KV-cache use, token counters, prefix cache, preemptions, queue,
prefill, decode and inference time), the router what its clients see (TTFT, inter-token and
end-to-end latency, finished requests and their sizes). Names and types follow vLLM's metrics
design document (docs/design/metrics.md); tests/e2e/test_metrics_names.py holds the list.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# A whole request, or one phase of it: from tens of milliseconds to a long generation.
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)
VLLM_LABELS = ["model_name", "role"]


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
        self.kv_peer_gbps = Gauge(
            "splitserve_kv_peer_bandwidth_gbps", "GB/s of the handshake's timed read from a KV peer", ["role", "peer", "path"], registry=r
        )

    def outcome(self, outcome: str) -> None:
        self.requests.labels(self.role, outcome).inc()

    def error(self, kind: str) -> None:
        self.errors.labels(self.role, kind).inc()

    def observe_engine(self, stats) -> None:
        self.waiting.labels(self.role).set(stats.num_waiting)
        self.running.labels(self.role).set(stats.num_running)
        self.kv_used.labels(self.role).set(stats.num_total_blocks - stats.num_free_blocks)
        self.kv_free.labels(self.role).set(stats.num_free_blocks)

    def engine_series(self, model_name: str) -> EngineSeries:
        """vLLM's engine metrics, for a worker; call once."""
        return EngineSeries(self.registry, model_name, self.role)

    def frontend_series(self, model_name: str) -> FrontendSeries:
        """vLLM's request metrics as a client sees them, for the router; call once."""
        return FrontendSeries(self.registry, model_name, self.role, self.ttft.labels(self.role), self.itl.labels(self.role))


class _Both:
    """Observes into two histograms (splitserve's and vLLM's name for one measurement)."""

    def __init__(self, first, second) -> None:
        self.first, self.second = first, second

    def observe(self, value: float) -> None:
        self.first.observe(value)
        self.second.observe(value)


class EngineSeries:
    """A worker's engine, under vLLM's names. Gauges are set and counters advanced from
    LLMEngine.stats() snapshots; the per-request histograms from its RequestTimes."""

    def __init__(self, registry: CollectorRegistry, model_name: str, role: str) -> None:
        r, labels, values = registry, VLLM_LABELS, (model_name, role)

        def gauge(name: str, doc: str):
            return Gauge(name, doc, labels, registry=r).labels(*values)

        def counter(name: str, doc: str):
            return Counter(name, doc, labels, registry=r).labels(*values)

        def histogram(name: str, doc: str):
            return Histogram(name, doc, labels, buckets=REQUEST_BUCKETS, registry=r).labels(*values)

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled (KV transfers under way included)")
        self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use, 0 to 1")
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.preemptions = counter("vllm:num_preemptions", "Running requests preempted for KV blocks")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed (prefix-cache hits included)")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens sampled by this worker")
        self.spec_drafts = counter("vllm:spec_decode_num_drafts", "Request-steps that checked proposed tokens (speculative decoding)")
        self.spec_draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Tokens proposed (speculative decoding)")
        self.spec_accepted_tokens = counter("vllm:spec_decode_num_accepted_tokens", "Proposed tokens accepted (speculative decoding)")
        self.queue_time = histogram("vllm:request_queue_time_seconds", "Time from arrival at the worker to first scheduled")
        self.prefill_time = histogram("vllm:request_prefill_time_seconds", "Time from first scheduled to the first token")
        self.decode_time = histogram("vllm:request_decode_time_seconds", "Time from the first token to the last")
        self.inference_time = histogram("vllm:request_inference_time_seconds", "Time from first scheduled to the last token")

    def observe(self, stats, last, request_times) -> None:
        """``stats`` and ``last``: this and the previous EngineStats (counters take the increments)."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting + stats.num_loading)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.prefix_queries.inc(stats.num_prefix_queried_tokens - last.num_prefix_queried_tokens)
        self.prefix_hits.inc(stats.num_prefix_hit_tokens - last.num_prefix_hit_tokens)
        self.preemptions.inc(stats.num_preemptions - last.num_preemptions)
        hits = stats.num_prefix_hit_tokens - last.num_prefix_hit_tokens
        self.prompt_tokens.inc(stats.num_prompt_tokens_computed - last.num_prompt_tokens_computed + hits)
        self.generation_tokens.inc(stats.num_generation_tokens - last.num_generation_tokens)
        if stats.spec is not None:  # acceptance rate: accepted / draft tokens; mean accepted length: 1 + accepted / drafts
            before = last.spec
            self.spec_drafts.inc(stats.spec.num_verifications - (before.num_verifications if before else 0))
            self.spec_draft_tokens.inc(stats.spec.num_draft_tokens - (before.num_draft_tokens if before else 0))
            self.spec_accepted_tokens.inc(stats.spec.num_accepted_tokens - (before.num_accepted_tokens if before else 0))
        for t in request_times:
            self.queue_time.observe(t.queue_seconds)
            self.prefill_time.observe(t.prefill_seconds)
            self.decode_time.observe(t.decode_seconds)
            self.inference_time.observe(t.inference_seconds)


class FrontendSeries:
    """The router's view of each request, under vLLM's names; ``ttft`` and ``itl`` also feed
    the splitserve histograms of the same measurement."""

    def __init__(self, registry: CollectorRegistry, model_name: str, role: str, ttft, itl) -> None:
        r, labels, values = registry, VLLM_LABELS, (model_name, role)
        vllm_ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", labels, buckets=LATENCY_BUCKETS, registry=r)
        vllm_itl = Histogram("vllm:inter_token_latency_seconds", "Gap between tokens", labels, buckets=LATENCY_BUCKETS, registry=r)
        self.ttft, self.itl = _Both(ttft, vllm_ttft.labels(*values)), _Both(itl, vllm_itl.labels(*values))
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the last token", labels, buckets=REQUEST_BUCKETS, registry=r).labels(*values)
        self._success = Counter("vllm:request_success", "Finished requests by finish reason", [*labels, "finished_reason"], registry=r)
        self._values = values
        self.prompt_tokens = Histogram(
            "vllm:request_prompt_tokens", "Prompt tokens of each finished request", labels, buckets=TOKEN_COUNT_BUCKETS, registry=r
        ).labels(*values)
        self.generation_tokens = Histogram(
            "vllm:request_generation_tokens", "Tokens generated for each finished request", labels, buckets=TOKEN_COUNT_BUCKETS, registry=r
        ).labels(*values)

    def finished(self, finish_reason: str, num_prompt_tokens: int, num_generation_tokens: int, e2e_seconds: float) -> None:
        self._success.labels(*self._values, finish_reason).inc()
        self.prompt_tokens.observe(num_prompt_tokens)
        self.generation_tokens.observe(num_generation_tokens)
        self.e2e.observe(e2e_seconds)
