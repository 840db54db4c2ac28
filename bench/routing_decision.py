"""Latency of one prefill routing decision: the block-index lookup plus the policy's scoring.

Builds an index of --num-blocks blocks spread over --num-workers prefill workers,
in an in-process MemoryControlPlane and in a real redis-server this script starts
on a free port, then times ``match_prefix`` + ``PrefixAwarePolicy.pick_prefill``
for prompts of --prompt-tokens tokens that hit fully, hit half, or miss.
Hashing the prompt is timed on its own (it is the same for every store), and the
worker list is not part of a decision (the router refreshes it in the background).

    python bench/routing_decision.py --out bench/results/routing_decision
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from splitserve.controlplane import ControlPlane, KVEvent, MemoryControlPlane, RedisControlPlane, WorkerInfo, WorkerLoad
from splitserve.controlplane.testing import start_redis_server
from splitserve.engine.prefix_hash import hash_request_tokens
from splitserve.services.router.routing import PrefixAwarePolicy

PUBLISH_BATCH = 4096


def random_prompt(rng: random.Random, num_tokens: int) -> list[int]:
    return [rng.randrange(150_000) for _ in range(num_tokens)]


async def build_index(cp: ControlPlane, prompts: list[list[bytes]], num_workers: int) -> None:
    """Prompt i is cached whole on worker i % num_workers and its first half on the next worker,
    so every worker holds full and partial prefixes and lookups see several holders."""
    held: dict[str, list[bytes]] = {f"prefill-{w:02d}": [] for w in range(num_workers)}
    for i, hashes in enumerate(prompts):
        held[f"prefill-{i % num_workers:02d}"] += hashes
        held[f"prefill-{(i + 1) % num_workers:02d}"] += hashes[: len(hashes) // 2]
    for w, (worker_id, block_hashes) in enumerate(held.items()):
        load = WorkerLoad(num_waiting=w % 3, num_running=w % 5, num_tokens_in_flight=256 * (w % 4), num_free_blocks=1000, num_total_blocks=4000)
        await cp.register(WorkerInfo(worker_id, "prefill", f"10.0.0.{w}:50051", 16), ttl_seconds=3600, load=load)
        for start in range(0, len(block_hashes), PUBLISH_BATCH):
            await cp.publish_kv_events(worker_id, [KVEvent.stored(block_hashes[start : start + PUBLISH_BATCH])])


async def time_decisions(cp: ControlPlane, queries: list[list[bytes]], warmup: int) -> tuple[list[float], dict[str, int]]:
    policy = PrefixAwarePolicy()
    candidates = await cp.live_workers("prefill")
    worker_ids = [w.info.worker_id for w in candidates]
    latencies_us, reasons = [], {}
    for i, hashes in enumerate(queries):
        start = time.perf_counter_ns()
        matches = await cp.match_prefix(hashes, worker_ids)
        decision = policy.pick_prefill(hashes, candidates, matches)
        elapsed = time.perf_counter_ns() - start
        if i >= warmup:
            latencies_us.append(elapsed / 1000)
            reasons[decision.reason] = reasons.get(decision.reason, 0) + 1
    return latencies_us, reasons


def summarize(latencies_us: list[float]) -> dict[str, float]:
    ordered = sorted(latencies_us)
    return {
        "n": len(ordered),
        "p50_us": round(ordered[len(ordered) // 2], 1),
        "p99_us": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1),
        "mean_us": round(statistics.fmean(ordered), 1),
        "max_us": round(ordered[-1], 1),
    }


def machine() -> dict[str, str | int]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "unknown")
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    return {
        "cpu": cpu,
        "num_cpus": os.cpu_count() or 0,
        "python": platform.python_version(),
        "redis_server": redis_version,
        "platform": platform.platform(),
        "load_average_1m_at_start": os.getloadavg()[0],
    }


async def main(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    num_blocks_per_prompt = args.prompt_tokens // args.block_size
    num_prompts = -(-args.num_blocks // num_blocks_per_prompt)
    prompt_tokens = [random_prompt(rng, args.prompt_tokens) for _ in range(num_prompts)]
    prompts = [hash_request_tokens(t, args.block_size) for t in prompt_tokens]

    # Queries: a cached prompt (full hit), its first half plus a new half (partial), a new prompt (miss).
    total = args.iterations + args.warmup
    queries = {
        "full_hit": [prompts[rng.randrange(num_prompts)] for _ in range(total)],
        "half_hit": [],
        "miss": [hash_request_tokens(random_prompt(rng, args.prompt_tokens), args.block_size) for _ in range(total)],
    }
    for _ in range(total):
        tokens = prompt_tokens[rng.randrange(num_prompts)]
        half = args.prompt_tokens // 2
        queries["half_hit"].append(hash_request_tokens(tokens[:half] + random_prompt(rng, half), args.block_size))

    hash_us = []
    for tokens in prompt_tokens[: min(500, num_prompts)]:
        start = time.perf_counter_ns()
        hash_request_tokens(tokens, args.block_size)
        hash_us.append((time.perf_counter_ns() - start) / 1000)

    results: dict = {
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"num_indexed_blocks": sum(map(len, prompts))},
        "machine": machine(),
        "hash_prompt": summarize(hash_us),
        "stores": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        server = start_redis_server(Path(tmp))
        admin = redis.Redis.from_url(server.url)
        try:
            for name in ("memory", "redis"):
                cp = MemoryControlPlane() if name == "memory" else await RedisControlPlane.connect(server.url)
                start = time.perf_counter()
                await build_index(cp, prompts, args.num_workers)
                build_seconds = time.perf_counter() - start
                store: dict = {"build_index_seconds": round(build_seconds, 2)}
                for kind, hashes in queries.items():
                    if name == "redis":
                        admin.config_resetstat()
                    latencies, reasons = await time_decisions(cp, hashes, args.warmup)
                    store[kind] = summarize(latencies) | {"reasons": reasons}
                    if name == "redis":
                        # Time inside Redis (the Lua lookup), to tell it from the client's round trip.
                        evalsha = admin.info("commandstats").get("cmdstat_evalsha", {})
                        store[kind]["server_us_per_lookup"] = evalsha.get("usec_per_call")
                if name == "redis":
                    store["redis_used_memory"] = admin.info("memory")["used_memory_human"]
                results["stores"][name] = store
                await cp.close()
        finally:
            server.stop()
    results["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]
    return results


def render_markdown(results: dict, command: str) -> str:
    m, c = results["machine"], results["config"]
    lines = [
        "# Routing decision latency",
        "",
        "One prefill routing decision: `match_prefix` on the control plane (longest cached prefix of the",
        "prompt on each of the workers) plus `PrefixAwarePolicy.pick_prefill` scoring them. Prompt hashing is",
        "timed separately; the worker list is not part of a decision (the router refreshes it in the background).",
        "",
        f"- Command: `{command}`",
        f"- Machine: {m['num_cpus']}-core CPU VM, {m['cpu']}; Python {m['python']}; redis-server {m['redis_server']}"
        " on loopback on the same VM (no persistence); the client and the server share the cores.",
        f"- 1-minute load average {m['load_average_1m_at_start']:.1f} at the start, {m['load_average_1m_at_end']:.1f} at the end"
        " (other work shared the VM: read the tails with that in mind).",
        f"- Index: {c['num_indexed_blocks']:,} blocks ({c['prompt_tokens']}-token prompts, block size {c['block_size']})"
        f" over {c['num_workers']} prefill workers; each prompt cached whole on one worker and its first half on another.",
        f"- Queries ({c['iterations']} timed per row after {c['warmup']} warm-up): a {c['prompt_tokens']}-token prompt"
        " that is cached whole (full_hit), whose first half is cached (half_hit), or that nobody holds (miss).",
        "",
        "| store | query | p50 (µs) | p99 (µs) | mean (µs) | max (µs) | inside Redis (µs/lookup) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, store in results["stores"].items():
        for kind in ("full_hit", "half_hit", "miss"):
            s = store[kind]
            server_us = s.get("server_us_per_lookup", "")
            lines.append(f"| {name} | {kind} | {s['p50_us']} | {s['p99_us']} | {s['mean_us']} | {s['max_us']} | {server_us} |")
    h = results["hash_prompt"]
    lines += [
        "",
        f"Hashing a {c['prompt_tokens']}-token prompt (`hash_request_tokens`, same for every store): p50 {h['p50_us']} µs, p99 {h['p99_us']} µs.",
        "The Redis rows are mostly the client's round trip (redis-py on asyncio), not the lookup: compare"
        " the last column, Redis's own time per lookup from INFO commandstats (warm-up calls included).",
        f"Building the index: memory {results['stores']['memory']['build_index_seconds']} s, Redis"
        f" {results['stores']['redis']['build_index_seconds']} s; Redis used memory after: {results['stores']['redis'].get('redis_used_memory')}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-blocks", type=int, default=100_000)
    parser.add_argument("--num-workers", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    results = asyncio.run(main(args))
    command = "python " + " ".join(sys.argv)
    markdown = render_markdown(results, command)
    print(markdown)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(results | {"command": command}, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown)
