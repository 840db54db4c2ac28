"""Writes helm/splitserve/dashboards/splitserve.json, the Grafana dashboard the chart ships
(monitoring.dashboard.enabled): the router as clients see it, the prefill and decode pools,
and KV transfer between them. Run after changing a panel; tests/helm checks the file is
current and that every series it reads is one the services export.

    python scripts/grafana_dashboard.py
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "helm" / "splitserve" / "dashboards" / "splitserve.json"
RATE = "[$__rate_interval]"


def sel(role: str, vllm: bool = True) -> str:
    model = ', model_name=~"$model_name"' if vllm else ""
    return f'{{namespace="$namespace", role="{role}"{model}}}'


def quantiles(metric: str, selector: str, qs=(0.5, 0.9, 0.99)) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{selector}{RATE})))", f"p{int(q * 100)}") for q in qs]


class Board:
    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.y = 0
        self.x = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def panel(self, title: str, targets: list[tuple[str, str]], unit: str = "short", description: str = "") -> None:
        if self.x >= 24:
            self._newline()
        self.panels.append(
            {
                "type": "timeseries",
                "title": title,
                "description": description,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 8, "x": self.x, "y": self.y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [{"refId": chr(65 + i), "expr": expr, "legendFormat": legend} for i, (expr, legend) in enumerate(targets)],
            }
        )
        self.x += 8

    def _newline(self) -> None:
        if self.x:
            self.y += 8
            self.x = 0


def build() -> dict:
    b = Board()
    router = sel("router")
    b.row("Router (what clients see)")
    b.panel("Finished requests", [(f"sum by (finished_reason) (rate(vllm:request_success_total{router}{RATE}))", "{{finished_reason}}")], "reqps")
    b.panel("Errors", [(f'sum by (kind) (rate(splitserve_errors_total{sel("router", False)}{RATE}))', "{{kind}}")], "reqps",
            "Refused or failed requests by kind (queue_full, invalid_argument, a worker that failed, ...)")
    b.panel("Time to first token", quantiles("vllm:time_to_first_token_seconds", router), "s")
    b.panel("Inter-token latency", quantiles("vllm:inter_token_latency_seconds", router), "s")
    b.panel("End-to-end latency", quantiles("vllm:e2e_request_latency_seconds", router), "s")
    b.panel("Routing decisions", [(f'sum by (policy, reason) (rate(splitserve_routing_decisions_total{sel("router", False)}{RATE}))',
                                   "{{policy}} {{reason}}")], "ops")
    for role in ("prefill", "decode"):
        s = sel(role)
        b.row(f"{role.capitalize()} pool")
        b.panel("Requests", [(f"sum(vllm:num_requests_running{s})", "running"), (f"sum(vllm:num_requests_waiting{s})", "waiting"),
                             (f"count(vllm:num_requests_running{s})", "workers")])
        b.panel("KV-cache usage", [(f"vllm:kv_cache_usage_perc{s}", "{{pod}}")], "percentunit")
        if role == "prefill":
            b.panel("Prompt tokens", [(f"sum(rate(vllm:prompt_tokens_total{s}{RATE}))", "tokens/s")], "short")
            b.panel("Prefix-cache hit rate", [(f"sum(rate(vllm:prefix_cache_hits_total{s}{RATE})) / sum(rate(vllm:prefix_cache_queries_total{s}{RATE}))",
                                               "hit rate")], "percentunit")
            b.panel("Queue time", quantiles("vllm:request_queue_time_seconds", s, (0.5, 0.9)), "s")
            b.panel("Prefill time", quantiles("vllm:request_prefill_time_seconds", s, (0.5, 0.9)), "s")
        else:
            b.panel("Generated tokens", [(f"sum(rate(vllm:generation_tokens_total{s}{RATE}))", "tokens/s")], "short")
            b.panel("Decode time", quantiles("vllm:request_decode_time_seconds", s, (0.5, 0.9)), "s")
            b.panel("Preemptions", [(f"sum(rate(vllm:num_preemptions_total{s}{RATE}))", "preemptions/s")], "ops",
                    "Running requests preempted for KV blocks (recomputed later): the pool is short of KV cache")
    b.row("KV transfer (prefill -> decode)")
    decode = sel("decode", False)
    b.panel("Bytes moved", [(f"sum(rate(splitserve_kv_transfer_bytes_total{decode}{RATE}))", "bytes/s")], "Bps")
    b.panel("Transfer time", quantiles("splitserve_kv_transfer_seconds", decode, (0.5, 0.99)), "s")
    b.panel("Transfer failures", [(f'sum by (role, kind) (rate(splitserve_errors_total{{namespace="$namespace", kind=~"kv_.*|lease_expired"}}{RATE}))',
                                   "{{role}} {{kind}}")], "ops",
            "Failed or refused transfers (the request is then prefilled on the decode worker) and leases that expired on prefill workers")
    variables = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
        {"name": "namespace", "type": "query", "label": "Namespace", "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": "label_values(vllm:num_requests_running, namespace)", "refresh": 2},
        {"name": "model_name", "type": "query", "label": "Model", "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": 'label_values(vllm:num_requests_running{namespace="$namespace"}, model_name)', "refresh": 2,
         "includeAll": True, "allValue": ".*"},
    ]
    return {
        "title": "splitserve",
        "uid": "splitserve",
        "description": "Disaggregated serving: router, prefill and decode pools, KV transfer (vLLM metric names where vLLM has one)",
        "tags": ["splitserve", "llm"],
        "editable": True,
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": variables},
        "panels": [{**p, "id": i + 1} for i, p in enumerate(b.panels)],
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
