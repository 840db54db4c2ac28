#!/usr/bin/env python3
"""Disaggregated (prefill workers + decode workers) against colocated engines, same GPUs.

Starts each setup as real processes (router with its embedded control plane, workers pinned
to GPUs with --device), runs ``splitserve bench serve`` once per workload and request rate,
and scrapes the decode workers' KV-transfer histogram around each point, so a point's mean
transfer time can be set against its mean TTFT. Every point's full result (per-request
records included) is kept; ``bench/disagg_report.py`` turns them into tables and plots and
recomputes goodput for any SLOs.

Setups (``--setups``):
  disagg  ``--prefill`` prefill workers and ``--decode`` decode workers, every prompt
          prefilled on a prefill worker (router --prefill-threshold 0 unless given)
  coloc   decode-role workers that prefill their own prompts, on the disaggregated setup's
          GPUs (no prefill pool: the router sends each request to one engine, data parallel)

GPUs: the workers of a setup take ``--devices`` in order (prefill workers first), a worker of
TP size t the next t of them, so both setups use the same GPUs; the colocated setup runs as
many engines of ``--coloc-tp`` as those GPUs hold. On a CPU machine use ``--devices cpu cpu``
(TP on the CPU runs its ranks with gloo) and a tiny checkpoint.

    python bench/disagg.py --model /dev/shm/llama8b --devices cuda:0 cuda:1 \\
        --workloads prefill_heavy decode_heavy mixed --out $OUT/disagg
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from splitserve.testing.cluster import Cluster, Service


@dataclass(frozen=True)
class Workload:
    name: str
    input_len: int
    output_len: int
    range_ratio: float
    rates: tuple[float, ...]
    seconds_per_point: float  # prompts per point = max(min_prompts, rate * seconds)
    min_prompts: int
    prefix_len: int = 0
    num_prefixes: int = 1


# Issue 12's workloads. Rates are requests/s across the whole setup; they are meant to reach
# past saturation of an 8B model on two H200s (override with --rates NAME=r1,r2,...).
WORKLOADS = {
    "prefill_heavy": Workload("prefill_heavy", 3072, 128, 0.33, (2, 4, 6, 8, 12, 16), 12, 24),
    "decode_heavy": Workload("decode_heavy", 256, 1024, 0.0, (2, 4, 8, 16), 10, 16),
    "mixed": Workload("mixed", 512, 256, 0.5, (4, 8, 16), 10, 24, prefix_len=1536, num_prefixes=8),
    # Issue 10's prefill-heavy workload, sized for four GPUs.
    "prefill_2k": Workload("prefill_2k", 2048, 128, 0.0, (4, 8, 12, 16, 24), 10, 24),
}

KV_SECONDS = "splitserve_kv_transfer_seconds"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--setups", nargs="+", default=["disagg", "coloc"], choices=["disagg", "coloc"])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--rates", nargs="*", default=[], metavar="NAME=R1,R2", help="override a workload's rates")
    p.add_argument("--scale", type=float, default=1.0, help="multiply prompt and output lengths (CPU smoke runs)")
    p.add_argument("--seconds-per-point", type=float, default=None, help="override every workload's")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers in the disaggregated setup")
    p.add_argument("--decode", type=int, default=1, help="decode workers in the disaggregated setup")
    p.add_argument("--prefill-tp", type=int, default=1, help="TP size of each prefill worker")
    p.add_argument("--decode-tp", type=int, default=1, help="TP size of each decode worker")
    p.add_argument("--coloc-tp", type=int, default=None,
                   help="TP size of each colocated engine (default --decode-tp); as many as the disaggregated setup's GPUs allow")
    p.add_argument("--devices", nargs="+", default=["cuda:0", "cuda:1"],
                   help="a worker of TP size t takes the next t entries and runs on the first (its ranks on the GPUs after it)")
    p.add_argument("--worker-args", default="", help="extra arguments for every worker (one shell-quoted string)")
    p.add_argument("--router-args", default="", help="extra arguments for the router")
    p.add_argument("--goodput", nargs="+", default=["ttft:500", "tpot:25"], help="SLOs bench serve counts goodput at")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip points that would start after this many seconds")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def workloads_from(args: argparse.Namespace) -> list[Workload]:
    overrides = dict(item.split("=", 1) for item in args.rates)
    unknown = set(overrides) - set(WORKLOADS)
    if unknown:
        raise SystemExit(f"--rates names unknown workloads: {sorted(unknown)}")
    chosen = []
    for name in args.workloads:
        w = WORKLOADS[name]
        if name in overrides:
            w = replace(w, rates=tuple(float(r) for r in overrides[name].split(",")))
        if args.seconds_per_point is not None:
            w = replace(w, seconds_per_point=args.seconds_per_point)
        if args.scale != 1.0:
            w = replace(w, input_len=max(1, round(w.input_len * args.scale)), output_len=max(1, round(w.output_len * args.scale)),
                        prefix_len=round(w.prefix_len * args.scale))
        chosen.append(w)
    return chosen


def worker_specs(setup: str, args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(role, worker id, its arguments) per worker; each takes the next ``tp`` of --devices."""
    if setup == "disagg":
        pools = [("prefill", args.prefill, args.prefill_tp), ("decode", args.decode, args.decode_tp)]
    else:
        gpus = args.prefill * args.prefill_tp + args.decode * args.decode_tp
        tp = args.coloc_tp or args.decode_tp
        if gpus % tp:
            raise SystemExit(f"the disaggregated setup's {gpus} devices do not split into colocated engines of TP={tp}")
        pools = [("decode", gpus // tp, tp)]
    needed = sum(count * tp for _, count, tp in pools)
    if len(args.devices) < needed:
        raise SystemExit(f"{setup} needs {needed} --devices, got {args.devices}")
    specs, next_device = [], 0
    for role, count, tp in pools:
        for _ in range(count):
            own = ["--device", args.devices[next_device], *(["--tp-size", str(tp)] if tp > 1 else [])]
            specs.append((role, f"{setup}-{role}-{len(specs)}", own))
            next_device += tp
    return specs


def start_setup(setup: str, args: argparse.Namespace) -> Cluster:
    specs = worker_specs(setup, args)
    router_args = shlex.split(args.router_args)
    if setup == "disagg" and "--prefill-threshold" not in router_args:
        router_args += ["--prefill-threshold", "0"]
    cluster = Cluster(args.model, router_args=router_args, worker_args=shlex.split(args.worker_args))
    try:
        cluster.add_workers(*specs)  # each registered with the router's control plane by now
        time.sleep(2)  # the router's worker list refreshes every 0.5 s
    except BaseException:
        cluster.stop()
        raise
    return cluster


def kv_seconds(service: Service) -> tuple[float, float]:
    """(sum, count) of a worker's KV-transfer histogram; (0, 0) before its first transfer."""
    with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != KV_SECONDS:
            continue
        for sample in family.samples:
            if sample.name == f"{KV_SECONDS}_sum":
                total += sample.value
            elif sample.name == f"{KV_SECONDS}_count":
                count += sample.value
    return total, count


def run_point(cluster: Cluster, setup: str, w: Workload, rate: float, args: argparse.Namespace) -> dict:
    num_prompts = max(w.min_prompts, round(rate * w.seconds_per_point))
    label = f"{setup}_{w.name}_r{rate:g}"
    command = [
        sys.executable, "-m", "splitserve.cli", "bench", "serve", "--target", cluster.address, "--dataset", "random",
        "--num-prompts", str(num_prompts), "--input-len", str(w.input_len), "--output-len", str(w.output_len),
        "--range-ratio", str(w.range_ratio), "--prefix-len", str(w.prefix_len), "--num-prefixes", str(w.num_prefixes),
        "--request-rate", f"{rate:g}", "--seed", "0", "--num-warmups", "2", "--disable-tqdm", "--no-plots",
        "--percentiles", "50,90,99", "--request-timeout", "600", "--goodput", *args.goodput,
        "--out", str(args.out / "points"), "--label", label,
    ]
    decode = [s for s in cluster.workers if s.role == "decode"]
    before = [kv_seconds(s) for s in decode]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.monotonic() - started
    after = [kv_seconds(s) for s in decode]
    (args.out / "logs" / f"{label}.log").write_text(done.stdout + done.stderr)
    kv_sum = sum(a[0] - b[0] for a, b in zip(after, before))
    kv_count = sum(a[1] - b[1] for a, b in zip(after, before))
    row = {"setup": setup, "workload": w.name, "rate": rate, "num_prompts": num_prompts, "label": label,
           "returncode": done.returncode, "wall_s": round(wall, 2), "kv_transfers": int(kv_count),
           "mean_kv_transfer_ms": 1000 * kv_sum / kv_count if kv_count else None}
    result = args.out / "points" / f"{label}.json"
    if done.returncode == 0 and result.exists():
        metrics = json.loads(result.read_text())["points"][0]["metrics"]
        row.update({k: metrics.get(k) for k in (
            "completed", "failed", "request_throughput", "request_goodput", "output_throughput",
            "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p50_tpot_ms", "p99_tpot_ms",
            "p50_itl_ms", "p99_itl_ms")})
        if row["mean_kv_transfer_ms"] is not None and metrics.get("mean_ttft_ms"):
            # A ratio, not a part: the first token comes from the prefill worker, so the transfer
            # runs after it and delays the second token; it is set against TTFT for scale.
            row["kv_share_of_ttft"] = row["mean_kv_transfer_ms"] / metrics["mean_ttft_ms"]
    else:
        row["error"] = (done.stderr or done.stdout)[-2000:]
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    workloads = workloads_from(args)
    (args.out / "points").mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    started = time.monotonic()
    summary_path = args.out / "summary.json"
    summary = {
        "command": "python bench/disagg.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "gpus": _gpus()},
        "workloads": [asdict(w) for w in workloads], "goodput_slos": args.goodput, "rows": [], "skipped": [],
    }
    for setup in args.setups:
        if time.monotonic() - started > args.budget_s:
            summary["skipped"].append({"setup": setup, "why": "budget"})
            continue
        t0 = time.monotonic()
        cluster = start_setup(setup, args)
        print(f"{setup}: up in {time.monotonic() - t0:.0f} s ({', '.join(s.role + '@' + s.address for s in cluster.workers)})", flush=True)
        try:
            for w in workloads:
                for rate in w.rates:
                    if time.monotonic() - started > args.budget_s:
                        summary["skipped"].append({"setup": setup, "workload": w.name, "rate": rate, "why": "budget"})
                        continue
                    row = run_point(cluster, setup, w, rate, args)
                    summary["rows"].append(row)
                    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
                    print(_line(row), flush=True)
        finally:
            for service in cluster.workers:
                (args.out / "logs" / f"{setup}_{service.role}_{service.address.replace(':', '_')}.log").write_text(service.output())
            (args.out / "logs" / f"{setup}_router.log").write_text(cluster.router.output())
            cluster.stop()
    summary["elapsed_s"] = round(time.monotonic() - started, 1)
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    failed = [r["label"] for r in summary["rows"] if r["returncode"] != 0]
    if failed:
        print(f"points that failed: {failed}", file=sys.stderr)
    return 1 if failed or not summary["rows"] else 0


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _line(row: dict) -> str:
    if row["returncode"] != 0:
        return f"{row['label']}: FAILED ({row['returncode']}) {row.get('error', '')[-300:]}"
    share = row.get("kv_share_of_ttft")
    return (f"{row['label']:<28} req/s {_fmt(row['request_throughput'], '.2f'):>6} good {_fmt(row['request_goodput'], '.2f'):>6} "
            f"ttft p50/p99 {_fmt(row['p50_ttft_ms'], '.0f')}/{_fmt(row['p99_ttft_ms'], '.0f')} "
            f"tpot p50/p99 {_fmt(row['p50_tpot_ms'])}/{_fmt(row['p99_tpot_ms'])} itl p99 {_fmt(row['p99_itl_ms'])} "
            f"kv {_fmt(row['mean_kv_transfer_ms'], '.2f')} ms ({_fmt(None if share is None else 100 * share)}% of mean ttft)")


def _gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return out.stdout.split("\n")[:-1] if out.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        return []


if __name__ == "__main__":
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    sys.exit(main())
