"""PNG plots of a sweep: latency CDFs per point, and throughput and tail latency against
the swept variable. Uses matplotlib's Agg backend, so it needs no display."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: the benchmark runs headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from splitserve.bench.metrics import MS_PER_S, e2el, itls, percentile_word, tpot, ttft  # noqa: E402
from splitserve.bench.sweep import PointResult  # noqa: E402


def _per_request_ms(result: PointResult) -> dict[str, list[float]]:
    ok = [r for r in result.load.records if r.success]
    return {
        "TTFT": [ttft(r) * MS_PER_S for r in ok],
        "TPOT": [t * MS_PER_S for t in (tpot(r) for r in ok) if t is not None],
        "ITL": [gap * MS_PER_S for r in ok for gap in itls(r)],
        "E2E latency": [e2el(r) * MS_PER_S for r in ok],
    }


def plot_latency_cdfs(results: Sequence[PointResult], path: Path, title: str) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for result in results:
        for ax, (name, values) in zip(axes.flat, _per_request_ms(result).items()):
            if values:
                xs = np.sort(values)
                ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=result.point.label())
    for ax, name in zip(axes.flat, ("TTFT", "TPOT", "ITL", "E2E latency")):
        ax.set(title=name, xlabel="ms", ylabel="fraction of samples", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _axis(results: Sequence[PointResult]) -> tuple[str, list[str], dict[str, list[tuple[int, PointResult]]]]:
    """The swept variable as categorical x positions ("inf" has no place on a numeric
    axis), and one series per value of the other variable."""
    rates = sorted({r.point.request_rate for r in results})
    concs = sorted({r.point.max_concurrency for r in results}, key=lambda c: math.inf if c is None else c)

    def rate_word(rate: float) -> str:
        return "inf" if math.isinf(rate) else f"{rate:g}"

    def conc_word(conc: int | None) -> str:
        return "unbounded" if conc is None else str(conc)

    series: dict[str, list[tuple[int, PointResult]]] = {}
    if len(rates) > 1 or len(concs) == 1:
        for r in results:
            key = f"max concurrency {conc_word(r.point.max_concurrency)}"
            series.setdefault(key, []).append((rates.index(r.point.request_rate), r))
        return "request rate (req/s)", [rate_word(x) for x in rates], series
    for r in results:
        key = f"rate {rate_word(r.point.request_rate)}"
        series.setdefault(key, []).append((concs.index(r.point.max_concurrency), r))
    return "max concurrency", [conc_word(c) for c in concs], series


def plot_throughput(results: Sequence[PointResult], path: Path, title: str) -> None:
    xlabel, ticks, series = _axis(results)
    fig, (tok_ax, req_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for k, (name, points) in enumerate(series.items()):
        xs, color = [x for x, _ in points], f"C{k}"  # one colour per series, one style per quantity
        tok_ax.plot(xs, [r.metrics.output_throughput for _, r in points], "o-", color=color, label=f"output, {name}")
        tok_ax.plot(xs, [r.metrics.total_token_throughput for _, r in points], "s--", color=color, label=f"total, {name}")
        req_ax.plot(xs, [r.metrics.request_throughput for _, r in points], "o-", color=color, label=f"completed, {name}")
        goodput = [r.metrics.request_goodput for _, r in points]
        if all(g is not None for g in goodput):
            req_ax.plot(xs, goodput, "^--", color=color, label=f"goodput, {name}")
    tok_ax.set(title="Token throughput", ylabel="tokens/s")
    req_ax.set(title="Request throughput", ylabel="requests/s")
    for ax in (tok_ax, req_ax):
        ax.set(xlabel=xlabel, xticks=range(len(ticks)), xticklabels=ticks)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tail_latency(results: Sequence[PointResult], path: Path, percentile: float, title: str) -> None:
    xlabel, ticks, series = _axis(results)
    pw = percentile_word(percentile)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric in zip(axes, ("ttft", "tpot")):
        for k, (name, points) in enumerate(series.items()):
            dists = [(x, r.metrics.distribution(metric)) for x, r in points]
            dists = [(x, d) for x, d in dists if d is not None]
            if not dists:
                continue
            xs, color = [x for x, _ in dists], f"C{k}"
            ax.plot(xs, [d.percentile(percentile) for _, d in dists], "o-", color=color, label=f"p{pw}, {name}")
            ax.plot(xs, [d.median for _, d in dists], "s:", color=color, label=f"median, {name}")
        ax.set(title=f"{metric.upper()}", xlabel=xlabel, ylabel="ms", xticks=range(len(ticks)), xticklabels=ticks)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
