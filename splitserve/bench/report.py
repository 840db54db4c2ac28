"""Printing results as vLLM prints them, and the JSON file that holds everything."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splitserve.bench.metrics import BenchmarkMetrics, percentile_word
from splitserve.bench.sweep import PointResult, SweepPoint

SCHEMA = "splitserve.bench.serve/1"
_HEADERS = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}


def _row(name: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{name:<40} {value:<10.2f}"
    return f"{name:<40} {'n/a' if value is None else value:<10}"


def format_point(point: SweepPoint, burstiness: float, m: BenchmarkMetrics) -> str:
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]
    lines.append(_row("Successful requests:", m.completed))
    lines.append(_row("Failed requests:", m.failed))
    lines += [_row(f"  {code}:", count) for code, count in m.failed_by_code.items()]
    if point.max_concurrency is not None:
        lines.append(_row("Maximum request concurrency:", point.max_concurrency))
    if not math.isinf(point.request_rate):
        lines.append(_row("Request rate configured (RPS):", float(point.request_rate)))
        lines.append(_row("Burstiness factor:", float(burstiness)))
    lines.append(_row("Benchmark duration (s):", m.duration_s))
    lines.append(_row("Total input tokens:", m.total_input_tokens))
    lines.append(_row("Total generated tokens:", m.total_output_tokens))
    lines.append(_row("Request throughput (req/s):", m.request_throughput))
    if m.request_goodput is not None:
        lines.append(_row("Request goodput (req/s):", m.request_goodput))
    lines.append(_row("Output token throughput (tok/s):", m.output_throughput))
    lines.append(_row("Peak output token throughput (tok/s):", m.max_output_tokens_per_s))
    lines.append(_row("Peak concurrent requests:", m.max_concurrent_requests))
    lines.append(_row("Peak requests in flight:", m.max_in_flight_requests))
    lines.append(_row("Total token throughput (tok/s):", m.total_token_throughput))
    for name, (short, header) in _HEADERS.items():
        dist = m.distribution(name)
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        lines.append(_row(f"Mean {short} (ms):", dist.mean if dist else None))
        lines.append(_row(f"Median {short} (ms):", dist.median if dist else None))
        for p, value in dist.percentiles if dist else ():
            lines.append(_row(f"P{percentile_word(p)} {short} (ms):", value))
    lines.append("=" * 50)
    return "\n".join(lines)


def format_summary(results: Sequence[PointResult], percentile: float) -> str:
    """One line per sweep point, for comparing points at a glance."""
    pw = percentile_word(percentile)
    head = (
        f"{'point':<22}{'ok':>6}{'fail':>6}{'req/s':>9}{'out tok/s':>11}"
        f"{'TTFT p50':>10}{f'TTFT p{pw}':>10}{'TPOT p50':>10}{f'TPOT p{pw}':>10}{'ITL p50':>9}"
    )

    def ms(dist: Any, p: float | None) -> str:
        if dist is None:
            return "n/a"
        return f"{dist.median if p is None else dist.percentile(p):.1f}"

    lines = [head, "-" * len(head)]
    for r in results:
        m = r.metrics
        lines.append(
            f"{r.point.label():<22}{m.completed:>6}{m.failed:>6}{m.request_throughput:>9.2f}"
            f"{m.output_throughput:>11.1f}{ms(m.ttft_ms, None):>10}{ms(m.ttft_ms, percentile):>10}"
            f"{ms(m.tpot_ms, None):>10}{ms(m.tpot_ms, percentile):>10}{ms(m.itl_ms, None):>9}"
        )
    return "\n".join(lines)


def _json_rate(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate  # JSON has no infinity


def results_document(
    config: dict[str, Any], model_info: dict[str, Any], results: Sequence[PointResult]
) -> dict[str, Any]:
    """Config, per-point metrics and per-request records (times in s from the point's start)."""
    return {
        "schema": SCHEMA,
        "config": config,
        "model_info": model_info,
        "points": [
            {
                "label": r.point.label(),
                "request_rate": _json_rate(r.point.request_rate),
                "max_concurrency": r.point.max_concurrency,
                "metrics": r.metrics.to_dict(),
                "records": [rec.to_dict() for rec in r.load.records],
            }
            for r in results
        ],
    }


def write_json(path: Path, document: dict[str, Any]) -> None:
    # allow_nan=False: a NaN or infinity that slipped through should fail here, not
    # produce a file other JSON readers reject.
    path.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
