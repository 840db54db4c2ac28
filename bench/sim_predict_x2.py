#!/usr/bin/env python3
"""The simulator's predictions for the two-GPU run planned next (llama-3.1-8b shape on 2x H200):
two colocated engines, 1 prefill + 1 decode worker, and 1 + 1 with adaptive placement, for
issue 12's three workloads at the rates of the recorded runs, written before that run.

    python bench/sim_predict_x2.py --profile bench/results/sim_validation/llama-3.1-8b_h200_async.json \\
        --dispatch-ms 15.9 --out bench/results/sim_sweep/x2_predictions.md
"""
from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path

from splitserve.bench.metrics import compute_metrics
from splitserve.profile.schema import Profile
from splitserve.services.router.placement import EngineBudget, PlacementPolicy, PlacementSLO
from splitserve.sim.cluster import Layout, Overheads, Simulator
from splitserve.sim.worker import EngineLimits
from splitserve.sim.workload import WorkloadSpec, bench_requests

RATES = {"prefill_heavy": (8, 10, 12), "decode_heavy": (8, 16, 24), "mixed": (4, 8, 16)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", type=Path, required=True)
    p.add_argument("--dispatch-ms", type=float, default=0.0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    spec = importlib.util.spec_from_file_location("disagg", Path(__file__).with_name("disagg.py"))
    disagg = importlib.util.module_from_spec(spec)
    sys.modules["disagg"] = disagg
    spec.loader.exec_module(disagg)
    profile = Profile.load(args.profile)
    limits = EngineLimits(256, 8192, 50_000, profile.block_size)
    overheads = Overheads(args.dispatch_ms)
    policy = PlacementPolicy(profile, profile, PlacementSLO(500.0, 50.0), EngineBudget(8192), EngineBudget(8192))
    setups = {
        "colocated (2C)": Layout(0, 2, None, profile, limits, overheads=overheads),
        "1P1D": Layout(1, 1, profile, profile, limits, overheads=overheads),
        "1P1D adaptive": Layout(1, 1, profile, profile, limits, placement="adaptive", overheads=overheads, placement_policy=policy),
    }
    lines = [f"Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`", "",
             "| workload | rate | setup | goodput TTFT<=500,TPOT<=25 | TPOT<=15 | mean TTFT ms | mean TPOT ms | p99 ITL ms | local / remote |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for name, rates in RATES.items():
        w = disagg.WORKLOADS[name]
        for rate in rates:
            num_prompts = max(w.min_prompts, round(rate * w.seconds_per_point))
            requests = bench_requests(WorkloadSpec(num_prompts, w.input_len, w.output_len, rate, w.range_ratio, w.prefix_len, w.num_prefixes))
            for setup, layout in setups.items():
                sim = Simulator(layout).run(requests)
                m = compute_metrics(sim.records, sim.duration_s, (99.0,), {"ttft": 500.0, "tpot": 25.0})
                g15 = compute_metrics(sim.records, sim.duration_s, (99.0,), {"ttft": 500.0, "tpot": 15.0}).request_goodput
                local = sum(v for k, v in sim.placements.items() if k.startswith("local"))
                remote = sum(v for k, v in sim.placements.items() if k.startswith("remote"))
                split = f"{local} / {remote}" if layout.placement == "adaptive" else "-"
                lines.append(f"| {name} | {rate} | {setup} | {m.request_goodput:.2f} | {g15:.2f} | {m.ttft_ms.mean:.0f} | "
                             f"{m.tpot_ms.mean:.2f} | {m.itl_ms.percentile(99.0):.1f} | {split} |")
                print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
