#!/usr/bin/env python3
"""Replays every recorded disaggregated and colocated 2x H200 run (bench/results/disagg_h200x2*/
summary.json) in the simulator and sets the simulated goodput, mean TTFT and mean TPOT beside
the measured ones: error = (simulated - measured) / measured.

Each row's workload is rebuilt from the summary's workload entry with the seed bench serve
used (0), so the simulated requests have the measured run's lengths and arrival times; the
layout is the setup's (disagg: 1 prefill + 1 decode worker, every prompt remote; coloc: 2
engines) and the workers' token budget is parsed from the recorded command.

    python bench/sim_validate.py --profile bench/results/sim_validation/llama-3.1-8b_h200_async.json \\
        --sync-profile bench/results/sim_validation/llama-3.1-8b_h200_sync.json --dispatch-ms 15.9 \\
        --out bench/results/sim_validation
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from splitserve.profile.schema import Profile
from splitserve.sim.cluster import Layout, Overheads
from splitserve.sim.run import simulate
from splitserve.sim.worker import EngineLimits
from splitserve.sim.workload import WorkloadSpec

RUNS = {
    # run directory -> the engine the run used: "async" (async scheduling, the current
    # engine) or "sync" (steps waited for; those runs also hit a host-side ceiling)
    "disagg_h200x2_async/decode_heavy": "async",
    "disagg_h200x2_async/prefill_heavy_b8192": "async",
    "disagg_h200x2_async/prefill_heavy_coloc_b2048": "async",
    "disagg_h200x2_run2/decode_heavy": "sync",
    "disagg_h200x2_run2/prefill_heavy_b8192": "sync",
    "disagg_h200x2_run2/prefill_heavy_coloc_b2048": "sync",
    "disagg_h200x2": "sync",
}
SLOS = {"ttft": 500.0, "tpot": 25.0}
METRICS = ("request_goodput", "mean_ttft_ms", "mean_tpot_ms")


def budget_of(command: str) -> int:
    m = re.search(r"--max-num-batched-tokens (\d+)", command)
    return int(m.group(1)) if m else 8192


def spec_of(workload: dict, rate: float, num_prompts: int) -> WorkloadSpec:
    return WorkloadSpec(num_prompts, workload["input_len"], workload["output_len"], rate, workload["range_ratio"],
                        workload["prefix_len"], workload["num_prefixes"])


def layout_of(setup: str, profile: Profile, budget: int, overheads: Overheads, engine: str) -> Layout:
    limits = EngineLimits(max_num_seqs=256, max_num_batched_tokens=budget, block_size=profile.block_size,
                          async_scheduling=engine == "async")
    if setup == "disagg":
        return Layout(1, 1, profile, profile, limits, placement="remote", overheads=overheads)
    return Layout(0, 2, None, profile, limits, overheads=overheads)


def error(sim: float | None, real: float | None) -> float | None:
    if sim is None or real is None or real == 0:
        return None
    return (sim - real) / real


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=Path("bench/results"))
    p.add_argument("--profile", type=Path, required=True, help="profile of the async engine")
    p.add_argument("--sync-profile", type=Path, default=None, help="profile of the synchronous engine (default: --profile)")
    p.add_argument("--dispatch-ms", type=float, default=0.0)
    p.add_argument("--stream-ms", type=float, default=0.0)
    p.add_argument("--router-message-us", type=float, default=0.0,
                   help="the router's event loop per admission and per message to a client (splitserve/sim/router_loop.py)")
    p.add_argument("--runs", nargs="*", default=list(RUNS), help="run directories under --results")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--label", default="validation")
    args = p.parse_args()
    profiles = {"async": Profile.load(args.profile), "sync": Profile.load(args.sync_profile or args.profile)}
    overheads = Overheads(args.dispatch_ms, args.stream_ms, args.router_message_us)
    rows = []
    for run in args.runs:
        summary = json.loads((args.results / run / "summary.json").read_text())
        workloads = {w["name"]: w for w in summary["workloads"]}
        for measured in summary["rows"]:
            if measured.get("returncode") != 0 or measured.get("completed") is None:
                continue
            engine = RUNS.get(run, "async")
            layout = layout_of(measured["setup"], profiles[engine], budget_of(summary["command"]), overheads, engine)
            spec = spec_of(workloads[measured["workload"]], measured["rate"], measured["num_prompts"])
            m = simulate(layout, spec, (50.0, 99.0), SLOS).result.metrics.to_dict()
            row = {"run": run, "engine": engine, "setup": measured["setup"], "workload": measured["workload"],
                   "rate": measured["rate"]}
            for key in METRICS:
                row[f"measured_{key}"], row[f"sim_{key}"] = measured[key], m[key]
                row[f"error_{key}"] = error(m[key], measured[key])
            row["measured_request_throughput"], row["sim_request_throughput"] = measured["request_throughput"], m["request_throughput"]
            rows.append(row)
            print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    (args.out / f"{args.label}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    (args.out / f"{args.label}.md").write_text(markdown(rows, command))
    print(f"wrote {args.out / args.label}.json and .md")
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.0f}%"


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| run | setup | workload | rate | goodput meas / sim (err) | mean TTFT ms meas / sim (err) | mean TPOT ms meas / sim (err) |",
             "|---|---|---|---:|---|---|---|"]
    for r in rows:
        cells = []
        for key in METRICS:
            meas, sim = r[f"measured_{key}"], r[f"sim_{key}"]
            cells.append(f"{meas:.2f} / {sim:.2f} ({_pct(r[f'error_{key}'])})")
        lines.append(f"| {r['run']} | {r['setup']} | {r['workload']} | {r['rate']:g} | " + " | ".join(cells) + " |")
    lines += ["", "Within 15% (all three metrics), by engine:", ""]
    for engine in ("async", "sync"):
        sel = [r for r in rows if r["engine"] == engine]
        if not sel:
            continue
        parts = []
        for key in METRICS:
            errs = [abs(r[f"error_{key}"]) for r in sel if r[f"error_{key}"] is not None]
            within = sum(e <= 0.15 for e in errs)
            parts.append(f"{key}: {within}/{len(errs)} within 15%, median |error| {sorted(errs)[len(errs) // 2] * 100:.0f}%")
        lines.append(f"- {engine} ({len(sel)} points): " + "; ".join(parts))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
