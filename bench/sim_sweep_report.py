#!/usr/bin/env python3
"""Tables and plots of bench/sim_sweep.py's output: each layout's capacity (the best goodput
over the rates swept) per workload, GPU count and SLO set, and which layout wins.

    python bench/sim_sweep_report.py bench/results/sim_sweep
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

# The goodput SLO sets, and the same at TTFT 500 / TPOT 25 with the point's ITL p99 <= 50 ms.
COLUMNS = {"ttft500_tpot25": "TTFT<=500, TPOT<=25", "ttft500_tpot15": "TTFT<=500, TPOT<=15", "itl50": "... and ITL p99<=50"}


def family(layout: str, gpus: int) -> str:
    """A layout's name independent of the GPU count: colocated, P=N/4, adaptive P=N/2, ..."""
    if layout.endswith("C"):
        return "colocated"
    m = re.match(r"(\d+)P(\d+)D(-adaptive)?", layout)
    # Later keys win where shares coincide (N=2: one prefill worker is N/2).
    share = {3 * gpus // 4: "3N/4", gpus // 4: "N/4", gpus // 2: "N/2"}.get(int(m.group(1)), m.group(1))
    return f"{'adaptive ' if m.group(3) else ''}P={share}"


def capacities(points: list[dict]) -> dict:
    """(workload, gpus, layout) -> {column: (best goodput, rate, p99 ITL there)}. A best at the
    grid's top rate is a lower bound of the layout's capacity (marked + in the tables)."""
    best: dict = defaultdict(dict)
    for p in points:
        key = (p["workload"], p["gpus"], p["layout"])
        for col in COLUMNS:
            goodput = p["goodput_ttft500_tpot25"] if col == "itl50" else p[f"goodput_{col}"]
            if col == "itl50" and p["p99_itl_ms"] > 50:
                goodput = 0.0
            if goodput > best[key].get(col, (-1,))[0]:
                best[key][col] = (goodput, p["rate"], p["p99_itl_ms"])
    return best


def markdown(best: dict, workloads: list[str], gpus: list[int], top_rates: dict) -> str:
    lines = []
    for w in workloads:
        lines += [f"### {w}", "", "| GPUs | layout | " + " | ".join(f"{c} (req/s)" for c in COLUMNS.values()) + " |",
                  "|---:|---|" + "---:|" * len(COLUMNS)]
        for n in gpus:
            layouts = [k[2] for k in best if k[0] == w and k[1] == n]
            tops = {c: max(best[(w, n, lay)][c][0] for lay in layouts) for c in COLUMNS}
            top_rate = top_rates[(w, n)]
            for lay in layouts:
                cells = []
                for c in COLUMNS:
                    g, rate, _ = best[(w, n, lay)][c]
                    text = f"{g:.2f}{'+' if rate == top_rate else ''}"
                    cells.append(f"**{text}**" if g == tops[c] and g > 0 else text)
                lines.append(f"| {n} | {lay} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def winners(best: dict, workloads: list[str], gpus: list[int]) -> str:
    lines = ["| workload | GPUs | " + " | ".join(f"best at {c}" for c in COLUMNS.values()) + " |", "|---|---:|" + "---|" * len(COLUMNS)]
    for w in workloads:
        for n in gpus:
            layouts = [k[2] for k in best if k[0] == w and k[1] == n]
            cells = []
            for c in COLUMNS:
                ranked = sorted(layouts, key=lambda lay: -best[(w, n, lay)][c][0])
                top, second = ranked[0], ranked[1]
                g1, g2 = best[(w, n, top)][c][0], best[(w, n, second)][c][0]
                coloc = best[(w, n, f"{n}C")][c][0]
                vs = f", {g1 / coloc:.2f}x colocated" if top != f"{n}C" and coloc > 0 else ""
                cells.append(f"{top} {g1:.1f} ({second} {g2:.1f}{vs})")
            lines.append(f"| {w} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(best: dict, workloads: list[str], gpus: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(workloads), len(COLUMNS), figsize=(5 * len(COLUMNS), 3.6 * len(workloads)), squeeze=False)
    for i, w in enumerate(workloads):
        for j, (col, title) in enumerate(COLUMNS.items()):
            ax = axes[i][j]
            series: dict = defaultdict(list)
            for (wl, n, lay), cols in best.items():
                if wl == w:
                    series[family(lay, n)].append((n, cols[col][0] / n))
            for name, xy in sorted(series.items()):
                xy.sort()
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", linestyle="--" if "adaptive" in name else "-", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xticks(gpus, [str(g) for g in gpus])
            ax.set_title(f"{w}: {title}", fontsize=9)
            ax.set_xlabel("GPUs")
            ax.set_ylabel("goodput per GPU (req/s)")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path)
    args = p.parse_args()
    data = json.loads((args.dir / "sweep.json").read_text())
    points = data["points"]
    workloads = list(dict.fromkeys(p["workload"] for p in points))
    gpus = sorted({p["gpus"] for p in points})
    best = capacities(points)
    top_rates: dict = {}
    for p in points:
        top_rates[(p["workload"], p["gpus"])] = max(top_rates.get((p["workload"], p["gpus"]), 0), p["rate"])
    (args.dir / "capacity.md").write_text(f"Sweep: `{data['command']}`\n\n" + winners(best, workloads, gpus) + "\n\n"
                                          + markdown(best, workloads, gpus, top_rates))
    plot(best, workloads, gpus, args.dir / "capacity_per_gpu.png")
    print(winners(best, workloads, gpus))


if __name__ == "__main__":
    main()
