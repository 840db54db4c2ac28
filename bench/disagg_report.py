#!/usr/bin/env python3
"""Tables and plots from a ``bench/disagg.py`` run: disaggregated against colocated.

Goodput is recomputed from the per-request records for each ``--slo`` set, so one run can be
judged at several SLOs. Per workload it prints, for each setup and rate, throughput, goodput,
TTFT/TPOT/ITL p50 and p99 and the mean KV transfer time over the mean TTFT (a ratio for scale: the
first token comes from the prefill worker, so the transfer delays the second token), then the best goodput of each
setup and their ratio; writes ``report.md`` and one PNG per workload next to the run.

    python bench/disagg_report.py RUN_DIR --slo ttft:500,tpot:25 --slo ttft:1000,tpot:50
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from splitserve.bench.metrics import meets_slos, parse_goodput
from splitserve.bench.records import RequestRecord

SETUP_NAMES = {"disagg": "disaggregated", "coloc": "colocated"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="the --out directory of bench/disagg.py")
    p.add_argument("--slo", action="append", default=None, help="comma-separated KEY:MS pairs; repeatable")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


class Goodput:
    """A point's goodput at any SLOs: as bench serve measured it at the run's SLOs, recomputed
    from the per-request records at others (None where the records were not kept)."""

    def __init__(self, run_slos: dict[str, float], points: dict[str, dict]) -> None:
        self.run_slos = run_slos
        self.points = points

    def __call__(self, row: dict, slos: dict[str, float]) -> float | None:
        if slos == self.run_slos and row.get("request_goodput") is not None:
            return row["request_goodput"]
        point = self.points.get(row["label"])
        if point is None:
            return None
        records = [RequestRecord.from_dict(r) for r in point["records"]]
        return sum(meets_slos(r, slos) for r in records) / point["metrics"]["duration"]


def load_points(run: Path, rows: list[dict]) -> dict[str, dict]:
    points = {}
    for row in rows:
        path = run / "points" / f"{row['label']}.json"
        if row["returncode"] == 0 and path.exists():
            points[row["label"]] = json.loads(path.read_text())["points"][0]
    return points


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def workload_table(rows: list[dict], goodput: Goodput, slo_sets: list[dict[str, float]]) -> list[str]:
    slo_names = [",".join(f"{k}<={v:g}" for k, v in s.items()) for s in slo_sets]
    head = ["setup", "rate", "req/s", *[f"goodput {n}" for n in slo_names], "TTFT p50/p99 ms", "TPOT p50/p99 ms",
            "ITL p50/p99 ms", "KV ms (% of mean TTFT)", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row["returncode"] != 0:
            lines.append(f"| {SETUP_NAMES[row['setup']]} | {row['rate']:g} | FAILED (exit {row['returncode']}) |")
            continue
        share = row.get("kv_share_of_ttft")
        kv = "-" if row.get("mean_kv_transfer_ms") is None else f"{row['mean_kv_transfer_ms']:.2f} ({100 * share:.1f}%)"
        lines.append("| " + " | ".join([
            SETUP_NAMES[row["setup"]], f"{row['rate']:g}", _f(row["request_throughput"], ".2f"),
            *[_f(goodput(row, s), ".2f") for s in slo_sets],
            f"{_f(row['p50_ttft_ms'], '.0f')} / {_f(row['p99_ttft_ms'], '.0f')}",
            f"{_f(row['p50_tpot_ms'], '.1f')} / {_f(row['p99_tpot_ms'], '.1f')}",
            f"{_f(row['p50_itl_ms'], '.1f')} / {_f(row['p99_itl_ms'], '.1f')}",
            kv, str(row["failed"]),
        ]) + " |")
    return lines


def best_goodput(rows: list[dict], goodput: Goodput, slos: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Per setup: the highest goodput over the rates, and the rate it came at."""
    best: dict[str, tuple[float, float]] = {}
    for row in rows:
        value = goodput(row, slos) if row["returncode"] == 0 else None
        if value is not None and value > best.get(row["setup"], (-1.0, 0.0))[0]:
            best[row["setup"]] = (value, row["rate"])
    return best


def plot(workload: str, rows: list[dict], goodput: Goodput, slos: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("goodput (req/s)", None), ("TTFT p99 (ms)", "p99_ttft_ms"), ("TPOT p99 (ms)", "p99_tpot_ms"),
              ("ITL p99 (ms)", "p99_itl_ms")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    by_setup = defaultdict(list)
    for row in rows:
        if row["returncode"] == 0:
            by_setup[row["setup"]].append(row)
    for ax, (title, key) in zip(axes, panels):
        for setup, setup_rows in by_setup.items():
            rates = [r["rate"] for r in setup_rows]
            values = [goodput(r, slos) if key is None else r[key] for r in setup_rows]
            ax.plot(rates, values, marker="o", label=SETUP_NAMES[setup])
        if key == "p99_ttft_ms" and "ttft" in slos:
            ax.axhline(slos["ttft"], color="gray", linestyle=":", linewidth=1)
        if key == "p99_tpot_ms" and "tpot" in slos:
            ax.axhline(slos["tpot"], color="gray", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    slo_text = ", ".join(f"{k} <= {v:g} ms" for k, v in slos.items())
    fig.suptitle(f"{workload}: disaggregated vs colocated (goodput at {slo_text})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = json.loads((args.run / "summary.json").read_text())
    run_slos = parse_goodput(summary["goodput_slos"])
    slo_sets = [parse_goodput(s.split(",")) for s in args.slo] if args.slo else [run_slos]
    goodput = Goodput(run_slos, load_points(args.run, summary["rows"]))
    by_workload = defaultdict(list)
    for row in summary["rows"]:
        by_workload[row["workload"]].append(row)
    out = [f"Command: `{summary['command']}`", "", f"Machine: {summary['machine']}", ""]
    for workload, rows in by_workload.items():
        spec = next(w for w in summary["workloads"] if w["name"] == workload)
        out += [f"## {workload}", "", "Workload: " + ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name"), ""]
        out += workload_table(rows, goodput, slo_sets)
        out.append("")
        for slos in slo_sets:
            best = best_goodput(rows, goodput, slos)
            text = ", ".join(f"{SETUP_NAMES[s]} {g:.2f} req/s (at rate {r:g})" for s, (g, r) in sorted(best.items()))
            if "disagg" in best and "coloc" in best and best["coloc"][0] > 0:
                text += f"; disaggregated / colocated = {best['disagg'][0] / best['coloc'][0]:.2f}x"
            out.append(f"- best goodput at {', '.join(f'{k}<={v:g} ms' for k, v in slos.items())}: {text}")
        out.append("")
        if not args.no_plots:
            png = args.run / f"{workload}.png"
            plot(workload, rows, goodput, slo_sets[0], png)
            out += [f"![{workload}]({png.name})", ""]
    if summary.get("skipped"):
        out += ["Skipped (time budget): " + ", ".join(json.dumps(s) for s in summary["skipped"]), ""]
    text = "\n".join(out)
    (args.run / "report.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
