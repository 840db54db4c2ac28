#!/usr/bin/env python3
"""Soak: a router, a prefill and a decode worker on loopback under bounded load at saturation
for a long time, recording what must stay flat.

Every --interval seconds it records, per process, the resident memory (VmRSS) and the open
file descriptors; per worker, the KV blocks in use and pinned; and the requests answered so
far by status. The load is --concurrency clients, each sending its next request as soon as
the last one ends (mixed prompt and output lengths, some with stop strings, some cancelled
part way), which keeps the workers saturated without an unbounded queue. At the end the load
stops, the workers must give every block back, and a table says how each series moved.

    python3 bench/soak.py --minutes 25 --out bench/results/soak        # the record
    python3 bench/soak.py --minutes 2 --out /tmp/soak-check            # a check of the script

Loopback only; the model is the tiny random-weight checkpoint this script writes (or --model).
Writes samples.csv, summary.json and soak.png under --out, and prints the table last.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc

from splitserve.client import AsyncClient
from splitserve.testing.cluster import Cluster, wait_until
from splitserve.v1 import worker_pb2 as worker_pb
from splitserve.v1 import worker_pb2_grpc

WORKER_KEY = "soak-worker-key"
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def worker_blocks(service) -> tuple[int, int]:
    """(blocks in use, blocks pinned); cached blocks count as free, as the engine reuses them."""
    with grpc.insecure_channel(service.address) as channel:
        stub = (worker_pb2_grpc.PrefillWorkerStub if service.role == "prefill" else worker_pb2_grpc.DecodeWorkerStub)(channel)
        s = stub.GetStats(worker_pb.StatsRequest(), timeout=10, metadata=(("authorization", f"Bearer {WORKER_KEY}"),))
    return s.num_total_blocks - s.num_free_blocks, s.num_pinned_blocks


class Load:
    """--concurrency clients in a loop; counts answers by status code."""

    def __init__(self, address: str, concurrency: int, seed: int) -> None:
        self.address = address
        self.concurrency = concurrency
        self.random = random.Random(seed)
        self.counts: dict[str, int] = {}
        self.stopping = asyncio.Event()

    def _count(self, code: str) -> None:
        self.counts[code] = self.counts.get(code, 0) + 1

    async def _one(self, client: AsyncClient) -> None:
        r = self.random
        prompt = " ".join(r.choice(WORDS) for _ in range(r.randint(4, 200)))
        kwargs = {"max_tokens": r.randint(1, 64), "ignore_eos": True, "temperature": r.choice([0.0, 0.8])}
        if r.random() < 0.2:
            kwargs["stop"] = ["fox jumps", "zzz"]
        cancel_after = r.randint(1, 4) if r.random() < 0.1 else None
        try:
            num = 0
            async for _ in client.stream(prompt, timeout=120, **kwargs):
                num += 1
                if cancel_after is not None and num >= cancel_after:
                    self._count("CANCELLED_BY_CLIENT")
                    return  # leaving the stream cancels the call: the workers must free its blocks
            self._count("OK")
        except grpc.aio.AioRpcError as e:
            self._count(e.code().name)

    async def _client(self) -> None:
        client = AsyncClient(self.address)
        try:
            while not self.stopping.is_set():
                await self._one(client)
        finally:
            await client.close()

    async def run(self) -> None:
        await asyncio.gather(*(self._client() for _ in range(self.concurrency)))


async def soak(cluster: Cluster, args) -> list[dict]:
    load = Load(cluster.address, args.concurrency, args.seed)
    running = asyncio.ensure_future(load.run())
    processes = {"router": cluster.router, **{w.role: w for w in cluster.workers}}
    samples, start = [], time.monotonic()
    end = start + args.minutes * 60
    while True:
        row = {"t": round(time.monotonic() - start, 1)}
        for name, service in processes.items():
            row[f"{name}_rss_mb"] = round(rss_bytes(service.proc.pid) / 2**20, 1)
            row[f"{name}_fds"] = open_fds(service.proc.pid)
        for w in cluster.workers:
            row[f"{w.role}_blocks_in_use"], row[f"{w.role}_blocks_pinned"] = await asyncio.to_thread(worker_blocks, w)
        row["ok"] = load.counts.get("OK", 0)
        row["errors"] = sum(n for code, n in load.counts.items() if code not in ("OK", "CANCELLED_BY_CLIENT"))
        row["cancelled"] = load.counts.get("CANCELLED_BY_CLIENT", 0)
        samples.append(row)
        print(json.dumps(row), flush=True)
        if time.monotonic() >= end:
            break
        await asyncio.sleep(args.interval)
    load.stopping.set()
    await asyncio.wait_for(running, timeout=300)
    samples[-1]["counts"] = dict(load.counts)
    return samples


def _quarter_medians(values: list[float]) -> tuple[float, float]:
    n = max(len(values) // 4, 1)
    first, last = sorted(values[:n]), sorted(values[-n:])
    return first[len(first) // 2], last[len(last) // 2]


def summarize(samples: list[dict], settled: dict[str, tuple[int, int]]) -> dict:
    summary: dict = {"minutes": samples[-1]["t"] / 60, "requests": samples[-1]["counts"], "after_load": {}}
    for key in samples[0]:
        if key.endswith("_rss_mb") or key.endswith("_fds"):
            first, last = _quarter_medians([s[key] for s in samples])
            summary[key] = {"first_quarter_median": first, "last_quarter_median": last, "max": max(s[key] for s in samples)}
    for role, (in_use, pinned) in settled.items():
        summary["after_load"][role] = {"blocks_in_use": in_use, "blocks_pinned": pinned}
    return summary


def plot(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    for key in [k for k in samples[0] if k.endswith("_rss_mb")]:
        axes[0].plot(t, [s[key] for s in samples], label=key.removesuffix("_rss_mb"))
    axes[0].set_ylabel("RSS (MiB)")
    for key in [k for k in samples[0] if k.endswith("_fds")]:
        axes[1].plot(t, [s[key] for s in samples], label=key.removesuffix("_fds"))
    axes[1].set_ylabel("open fds")
    for key in [k for k in samples[0] if k.endswith("_blocks_in_use") or k.endswith("_blocks_pinned")]:
        axes[2].plot(t, [s[key] for s in samples], label=key)
    axes[2].set_ylabel("KV blocks")
    for key in ("ok", "errors", "cancelled"):
        axes[3].plot(t, [s[key] for s in samples], label=key)
    axes[3].set_ylabel("requests (cumulative)")
    axes[3].set_xlabel("minutes")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("splitserve soak: tiny model, loopback, bounded load at saturation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=25.0)
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--concurrency", type=int, default=32, help="clients, each with one request at a time")
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: a tiny random-weight llama written here)")
    p.add_argument("--num-blocks", type=int, default=512, help="KV blocks per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="splitserve-soak-") as tmp:
        model = args.model
        if model is None:
            from splitserve.models.checkpoint_init import init_checkpoint

            model = init_checkpoint(Path(tmp) / "llama-tiny", "llama", "tiny")
        keys = Path(tmp) / "worker-keys"
        keys.write_text(WORKER_KEY + "\n")
        cluster = Cluster(model, ["--worker-keys-file", str(keys), "--max-inflight", str(4 * args.concurrency)],
                          ["--worker-keys-file", str(keys), "--num-blocks", str(args.num_blocks)], worker_key=WORKER_KEY)
        try:
            cluster.add_workers(("prefill", "soak-prefill"), ("decode", "soak-decode"))
            samples = asyncio.run(soak(cluster, args))

            def settled_blocks() -> dict[str, tuple[int, int]]:
                return {w.role: worker_blocks(w) for w in cluster.workers}

            wait_until(lambda: all(v == (0, 0) for v in settled_blocks().values()), timeout=60)
            settled = settled_blocks()
            logs = {s.role: s.output() for s in [cluster.router, *cluster.workers]}
        finally:
            cluster.stop()
    summary = summarize(samples, settled)
    summary["command"] = "python3 bench/soak.py " + " ".join(argv)
    summary["tracebacks_in_logs"] = {role: text.count("Traceback") for role, text in logs.items()}
    with open(args.out / "samples.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in samples[0] if k != "counts"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(samples)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(samples, args.out / "soak.png")
    print(f"\nsoak {summary['minutes']:.1f} min, requests {summary['requests']}")
    print(f"{'series':<22}{'first 1/4 median':>18}{'last 1/4 median':>18}{'max':>10}")
    for key, v in summary.items():
        if isinstance(v, dict) and "first_quarter_median" in v:
            print(f"{key:<22}{v['first_quarter_median']:>18}{v['last_quarter_median']:>18}{v['max']:>10}")
    for role, v in summary["after_load"].items():
        print(f"{role + ' after load':<22}blocks in use {v['blocks_in_use']}, pinned {v['blocks_pinned']}")
    print(f"tracebacks in logs: {summary['tracebacks_in_logs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
