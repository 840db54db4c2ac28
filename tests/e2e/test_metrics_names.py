"""The metrics of a real `splitserve up`: every endpoint it prints, scraped, carries vLLM's names
with vLLM's types and a model_name label, beside splitserve's own series, and the values add up
to what the clients were told."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitserve.testing.cluster import UpProcess, wait_until

pytestmark = [pytest.mark.slow]

# vLLM's metric names and types, from vLLM's metrics design document (docs/design/metrics.md,
# "v1 Metrics"; Prometheus counters gain _total on the wire, so the family names here have
# none), as vllm/v1/metrics/loggers.py registers them. Each is exported by the processes that
# measure it: the workers' engines, or the router, which sees requests as clients do.
VLLM_WORKER_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram",
}
VLLM_ROUTER_METRICS = {
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_success": "counter",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
}
# splitserve's own series of the disaggregated path, which no vLLM name covers.
SPLITSERVE_WORKER_METRICS = {"splitserve_waiting_requests": "gauge", "splitserve_kv_blocks_used": "gauge"}
SPLITSERVE_DECODE_METRICS = {"splitserve_kv_transfer_bytes": "counter", "splitserve_kv_transfer_seconds": "histogram"}
SPLITSERVE_ROUTER_METRICS = {"splitserve_routing_decisions": "counter", "splitserve_time_to_first_token_seconds": "histogram"}

ENDPOINT = re.compile(r"^\s+(router|prefill|decode)\s+gRPC (\S+).*metrics (http://\S+/metrics)")
LISTENING = re.compile(r"splitserve router listening on (\S+) .*OpenAI-compatible HTTP API at (\S+?)[;)]")
PROMPT = "Counting the metrics: one two three four five six seven eight nine ten eleven twelve thirteen fourteen"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def up(e2e_model_dir: Path) -> Iterator[tuple[str, dict[str, str], list[str], subprocess.Popen]]:
    """(HTTP base URL, role -> metrics URL, the lines `up` printed, the process)."""
    up = UpProcess(["--model", str(e2e_model_dir), "--port", str(_free_port()), "--http-port", str(_free_port())])
    try:
        listening = up.wait_for(LISTENING)
        metrics = {m.group(1): m.group(3) for m in map(ENDPOINT.search, up.lines) if m}
        yield listening.group(2), metrics, up.lines, up.proc
    finally:
        up.stop(60)


def scrape(url: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(httpx.get(url, timeout=10).text)}


def total(families: dict, name: str, suffix: str = "") -> float:
    return sum(s.value for s in families[name].samples if s.name == name + suffix)


def test_up_prints_every_endpoint_it_opened(up):
    _, metrics, lines, _ = up
    assert set(metrics) == {"router", "prefill", "decode"}, "".join(lines)
    for url in metrics.values():
        assert httpx.get(url, timeout=10).status_code == 200
    router_line = next(line for line in lines if ENDPOINT.search(line) and "router" in line)
    assert "HTTP http://" in router_line


def test_vllm_names_types_and_model_label(up, e2e_model_dir):
    base_url, metrics, _, _ = up
    model = e2e_model_dir.name
    usage = []
    for _ in range(2):  # the same prompt twice: the second finds its blocks in the prefix cache
        r = httpx.post(f"{base_url}/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 6}, timeout=120)
        assert r.status_code == 200, r.text
        usage.append(r.json()["usage"])
    num_prompt = sum(u["prompt_tokens"] for u in usage)
    num_generated = sum(u["completion_tokens"] for u in usage)

    # Workers publish every half second: wait until both requests are in their counters.
    def settled() -> bool:
        prefill, decode = scrape(metrics["prefill"]), scrape(metrics["decode"])
        generated = total(prefill, "vllm:generation_tokens", "_total") + total(decode, "vllm:generation_tokens", "_total")
        finished = total(prefill, "vllm:request_queue_time_seconds", "_count") + total(decode, "vllm:request_queue_time_seconds", "_count")
        return generated == num_generated and finished == 4

    wait_until(settled, timeout=60)
    scraped = {role: scrape(url) for role, url in metrics.items()}
    expected = {
        "router": {**VLLM_ROUTER_METRICS, **SPLITSERVE_ROUTER_METRICS},
        "prefill": {**VLLM_WORKER_METRICS, **SPLITSERVE_WORKER_METRICS},
        "decode": {**VLLM_WORKER_METRICS, **SPLITSERVE_WORKER_METRICS, **SPLITSERVE_DECODE_METRICS},
    }
    for role, families in scraped.items():
        types = {name: f.type for name, f in families.items()}
        for name, kind in expected[role].items():
            assert types.get(name) == kind, f"{role}: {name} is {types.get(name)}, vLLM's is a {kind}"
        # Each vLLM name comes from one kind of process, so sums over all pods count an event once.
        others = set(VLLM_WORKER_METRICS if role == "router" else VLLM_ROUTER_METRICS)
        assert not others & set(types), f"{role} exports {others & set(types)}"
        for name, family in families.items():
            if name.startswith("vllm:"):
                assert family.samples, f"{role}: {name} has no samples"
                for sample in family.samples:
                    assert sample.labels["model_name"] == model and sample.labels["role"] == role, (name, sample.labels)

    router, prefill, decode = scraped["router"], scraped["prefill"], scraped["decode"]
    # What the workers counted is what the clients were told.
    assert total(prefill, "vllm:prompt_tokens", "_total") == num_prompt
    assert total(prefill, "vllm:generation_tokens", "_total") == 2  # each request's first token
    assert total(router, "vllm:request_generation_tokens", "_sum") == num_generated
    assert total(router, "vllm:request_prompt_tokens", "_sum") == num_prompt
    assert total(router, "vllm:e2e_request_latency_seconds", "_count") == 2
    assert total(router, "vllm:time_to_first_token_seconds", "_count") == 2
    assert total(router, "vllm:request_success", "_total") == 2
    reasons = {s.labels["finished_reason"] for s in router["vllm:request_success"].samples if s.name.endswith("_total")}
    assert reasons <= {"stop", "length"}
    # The second request's full blocks came from the prefix cache.
    assert 0 < total(prefill, "vllm:prefix_cache_hits", "_total") <= total(prefill, "vllm:prefix_cache_queries", "_total") == num_prompt
    for families in (prefill, decode):
        assert total(families, "vllm:num_requests_running") == total(families, "vllm:num_requests_waiting") == 0
        assert 0 <= total(families, "vllm:kv_cache_usage_perc") < 1
        assert total(families, "vllm:request_inference_time_seconds", "_count") == 2
        assert total(families, "vllm:request_inference_time_seconds", "_sum") > 0


def test_ctrl_c_stops_it_quietly(up):
    """Last in this module: Ctrl-C (SIGINT to `up`) drains the workers, then the router, and
    nobody complains: no warning (a worker that could not deregister), no traceback."""
    _, _, lines, proc = up
    seen = len(lines)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0
    after = "".join(lines[seen:])
    assert "WARNING" not in after and "Traceback" not in after and "ERROR" not in after, after
