#!/usr/bin/env python3
"""Which layout serves most within the SLOs, by GPU count: the simulator over P:D splits and
colocated engines (and adaptive placement) for issue 12's three workloads.

For every GPU count N, workload and layout, the workload runs at a grid of rates (per-GPU
rates times N, prompts per point as bench/disagg.py sizes them) and the best goodput over
the grid is the layout's capacity at the SLO. Layouts: N colocated engines (NC), P prefill +
N-P decode workers with every prompt remote (PpDd), and the same with adaptive placement
(services/router/placement.py, SLOs TTFT 500 ms and ITL 50 ms).

    python bench/sim_sweep.py --profile bench/results/sim_validation/llama-3.1-8b_h200_async.json \\
        --dispatch-ms 15.9 --out bench/results/sim_sweep
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path

from splitserve.bench.metrics import compute_metrics
from splitserve.profile.schema import Profile
from splitserve.services.router.placement import EngineBudget, PlacementPolicy, PlacementSLO
from splitserve.sim.cluster import Layout, Overheads, Simulator
from splitserve.sim.router_view import ViewTiming
from splitserve.sim.worker import EngineLimits
from splitserve.sim.workload import WorkloadSpec, bench_requests

# Per-GPU request rates, multiplied by the GPU count (past saturation of every layout).
RATES_PER_GPU = {"prefill_heavy": (2, 3, 4, 5, 6), "decode_heavy": (6, 10, 14), "mixed": (4, 8, 12)}
# Prefill workers as shares of N: decode-heavy and mixed work never needs most GPUs prefilling.
PREFILL_SHARES = {"prefill_heavy": (4, 2, 4 / 3), "decode_heavy": (4, 2), "mixed": (4, 2)}
SLO_SETS = {"ttft500_tpot25": {"ttft": 500.0, "tpot": 25.0}, "ttft500_tpot15": {"ttft": 500.0, "tpot": 15.0}}


def workloads() -> dict:
    spec = importlib.util.spec_from_file_location("disagg", Path(__file__).with_name("disagg.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["disagg"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module.WORKLOADS


def layouts(n: int, shares: tuple[float, ...]) -> list[tuple[str, int, int, str]]:
    """(name, prefill workers, decode workers, placement); N/share prefill workers for each share."""
    splits = sorted({p for p in (int(n / share) for share in shares) if 1 <= p < n})
    out = [(f"{n}C", 0, n, "remote")]
    out += [(f"{p}P{n - p}D", p, n - p, "remote") for p in splits]
    out += [(f"{p}P{n - p}D-adaptive", p, n - p, "adaptive") for p in splits if p <= n // 2]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", type=Path, required=True)
    p.add_argument("--dispatch-ms", type=float, default=0.0)
    p.add_argument("--gpus", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--workloads", nargs="+", default=list(RATES_PER_GPU))
    p.add_argument("--budget", type=int, default=8192, help="every worker's --max-num-batched-tokens")
    p.add_argument("--exact-view", action="store_true",
                   help="the router sees every worker's load at once (no heartbeat staleness, every request counted "
                   "from dispatch): what a router that tracked its own placements fully would do")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    profile = Profile.load(args.profile)
    limits = EngineLimits(256, args.budget, 50_000, profile.block_size)
    placement = PlacementPolicy(profile, profile, PlacementSLO(500.0, 50.0), EngineBudget(args.budget), EngineBudget(args.budget))
    known = workloads()
    args.out.mkdir(parents=True, exist_ok=True)
    # Each point is appended as it finishes, and a rerun skips the points already there.
    partial = args.out / "sweep.jsonl"
    points = [json.loads(line) for line in partial.read_text().splitlines()] if partial.exists() else []
    done = {(p["workload"], p["layout"], p["rate"]) for p in points}
    for name in args.workloads:
        w = known[name]
        for n in args.gpus:
            for label, num_prefill, num_decode, how in layouts(n, PREFILL_SHARES[name]):
                layout = Layout(num_prefill, num_decode, profile if num_prefill else None, profile, limits,
                                placement=how, overheads=Overheads(args.dispatch_ms),
                                placement_policy=placement if how == "adaptive" else None)
                for per_gpu in RATES_PER_GPU[name]:
                    rate = per_gpu * n
                    if (name, label, rate) in done:
                        continue
                    num_prompts = max(w.min_prompts, round(rate * w.seconds_per_point))
                    spec = WorkloadSpec(num_prompts, w.input_len, w.output_len, rate, w.range_ratio, w.prefix_len, w.num_prefixes)
                    started = time.perf_counter()
                    sim = Simulator(layout, view=None if args.exact_view else ViewTiming()).run(bench_requests(spec))
                    row = {"workload": name, "gpus": n, "layout": label, "placement": how, "rate": rate,
                           "num_prompts": num_prompts, "placements": sim.placements}
                    for slo_name, slos in SLO_SETS.items():
                        m = compute_metrics(sim.records, sim.duration_s, (50.0, 99.0), slos)
                        row[f"goodput_{slo_name}"] = m.request_goodput
                    m = m.to_dict()
                    row.update({k: m[k] for k in ("request_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                                                  "p99_tpot_ms", "p99_itl_ms")})
                    points.append(row)
                    with partial.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{name} {label} rate {rate:g}: goodput {row['goodput_ttft500_tpot25']:.2f} "
                          f"(tpot15 {row['goodput_ttft500_tpot15']:.2f}), p99 ITL {row['p99_itl_ms']:.1f} ms "
                          f"[{time.perf_counter() - started:.1f}s]", flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    (args.out / "sweep.json").write_text(json.dumps({"command": command, "profile": str(args.profile),
                                                     "slo_sets": SLO_SETS, "points": points}, indent=1) + "\n")
    print(f"wrote {args.out / 'sweep.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
