#!/usr/bin/env python3
"""The serving path's own cost, on real processes (a router and one decode worker on loopback).

  cpu-per-token  runs ``bench serve`` (short prompts, long outputs, all at once) and reads each
                 process's CPU time from /proc: CPU microseconds per streamed token for the
                 router, the decode worker (and each one's event loop, its main thread) and the load
                 generator, and tokens per message.
  slow-reader    reads one decode stream (--prompts requests) directly from the decode worker,
                 sleeping between messages, on a channel with the router's decode-channel
                 options (or none): how many messages the steps came in, i.e. whether the
                 worker merges the steps that wait while its reader is behind.

    python bench/serving_path.py cpu-per-token --model checkpoints/tiny-llama --prompts 128 --output-len 256
    python bench/serving_path.py slow-reader --model checkpoints/tiny-llama --prompts 16 --output-len 150 --read-pause-s 0.1 [--default-options]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from splitserve.services.router.workers import DECODE_CHANNEL_OPTIONS
from splitserve.testing.cluster import Cluster
from splitserve.v1 import worker_pb2 as worker_pb
from splitserve.v1 import worker_pb2_grpc


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """A process's CPU time, or one of its threads' (the main thread runs a service's event loop)."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu_per_token(cluster: Cluster, args: argparse.Namespace) -> None:
    pids = {"router": cluster.router.proc.pid, "decode": cluster.workers[0].proc.pid}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    loop_before = {name: cpu_seconds(pid, pid) for name, pid in pids.items()}
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        subprocess.run([
            sys.executable, "-m", "splitserve.cli", "bench", "serve", "--target", cluster.address,
            "--num-prompts", str(args.prompts), "--input-len", "16", "--output-len", str(args.output_len),
            "--request-rate", "inf", "--disable-tqdm", "--num-warmups", "0", "--no-plots", "--out", out, "--label", "run",
        ], check=True, capture_output=True)
        wall = time.perf_counter() - started
        point = json.loads((Path(out) / "run.json").read_text())["points"][0]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    tokens = args.prompts * args.output_len
    chunks = sum(len(r["chunk_num_tokens"]) for r in point["records"])
    print(f"{tokens} tokens in {wall:.1f} s ({point['metrics']['output_throughput']:.0f} tok/s), "
          f"{tokens / chunks:.2f} tokens per message to the client")
    for name, pid in pids.items():
        used, loop = cpu_seconds(pid) - before[name], cpu_seconds(pid, pid) - loop_before[name]
        print(f"  {name:<8} {used:6.2f} s CPU = {1e6 * used / tokens:5.0f} us/token, "
              f"of which its event loop (main thread) {1e6 * loop / tokens:5.0f} us/token")
    client = (children.ru_utime + children.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    print(f"  {'client':<8} {client:6.2f} s CPU = {1e6 * client / tokens:5.0f} us/token")


def slow_reader(cluster: Cluster, args: argparse.Namespace) -> None:
    options = [] if args.default_options else list(DECODE_CHANNEL_OPTIONS)

    async def read() -> tuple[int, int]:
        async with grpc.aio.insecure_channel(cluster.workers[0].address, options=options) as channel:
            commands = iter([  # the stream ends when its requests do
                worker_pb.DecodeCommand(start=worker_pb.DecodeRequest(request=worker_pb.EngineRequest(
                    request_id=f"slow-{i}", prompt_token_ids=list(range(5, 30)), max_tokens=args.output_len, ignore_eos=True)))
                for i in range(args.prompts)
            ])
            tokens = messages = 0
            async for message in worker_pb2_grpc.DecodeWorkerStub(channel).Decode(commands, timeout=300):
                tokens, messages = tokens + sum(len(u.tokens) for u in message.updates), messages + 1
                await asyncio.sleep(args.read_pause_s)
            return tokens, messages

    tokens, messages = asyncio.run(read())
    print(f"channel options {options or 'default'}: {args.prompts} requests x {args.output_len} tokens = {args.output_len} steps "
          f"in {messages} messages ({tokens / messages:.1f} tokens per message), reader pausing {1000 * args.read_pause_s:.0f} ms per message")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["cpu-per-token", "slow-reader"])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--read-pause-s", type=float, default=0.02)
    p.add_argument("--default-options", action="store_true", help="slow-reader: gRPC's default channel options")
    args = p.parse_args(argv)
    cluster = Cluster(args.model, worker_args=["--max-num-seqs", "256"])
    try:
        cluster.add_workers(("decode", "decode-0"))
        time.sleep(2)
        (cpu_per_token if args.mode == "cpu-per-token" else slow_reader)(cluster, args)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    sys.exit(main())
