"""Multi-turn traffic whose prefixes outgrow the KV cache: prefix hit rate and TTFT, with and
without the host KV tier, on one offline engine (no server in the way).

--conversations conversations each take --turns turns. A turn's prompt is the conversation so
far (its first prompt of --system-len + --user-len tokens, every earlier answer and user
message) plus a new user message of --user-len tokens; it answers --output-len tokens. Turns
are sent in rounds: round k submits turn k of every conversation at once, so the prefixes of
all conversations compete for the cache between one turn and the next. With a KV cache
(--kv-cache-mb) smaller than the conversations' prefixes, turn k+1 of a conversation finds its
prefix evicted without the tier; with --host-kv-cache-mb it finds it on the host.

Recorded per mode: prefix hit rate (hit tokens / prompt tokens), TTFT p50/p90/mean (submit to
first token, per request, the round's queueing included), wall time, blocks spilled/restored.

    python bench/host_tier.py --arch llama --preset tiny --device cpu --kv-cache-mb 2 --host-kv-cache-mb 64
    python bench/host_tier.py --model /tmp/llama8b --device cuda --dtype bfloat16 --kv-cache-mb 8192 \\
        --host-kv-cache-mb 65536 --conversations 64 --turns 6 --out $OUT/host_tier.json
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from splitserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint directory; without it one of --arch/--preset is written")
    p.add_argument("--arch", default="llama")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-mb", type=int, required=True)
    p.add_argument("--host-kv-cache-mb", type=int, required=True)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-len", type=int, default=256)
    p.add_argument("--user-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--modes", default="off,host", help="off: no host tier; host: with it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def build_engine(args, model_dir: Path, host: bool) -> LLMEngine:
    cache = CacheConfig(block_size=args.block_size, kv_cache_bytes=args.kv_cache_mb << 20,
                        host_kv_cache_bytes=(args.host_kv_cache_mb << 20) if host else None)
    return LLMEngine(EngineConfig(
        model=ModelConfig(model_dir, dtype=getattr(torch, args.dtype), device=args.device),
        cache=cache,
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_tokens_limit=max(args.output_len, 16)),
    ))


def run(engine: LLMEngine, args) -> dict:
    rng = random.Random(args.seed)
    vocab = engine.vocab_size
    words = lambda n: [rng.randrange(10, vocab) for _ in range(n)]
    history = [words(args.system_len) for _ in range(args.conversations)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    engine.add_request("warm-up", words(40), params)  # untimed; its counts are taken out below
    while engine.has_unfinished:
        engine.step()
    before = engine.stats()
    ttfts, start = [], time.perf_counter()
    for turn in range(args.turns):
        submitted, first_seen = {}, {}
        for c in range(args.conversations):
            history[c] = history[c] + words(args.user_len)
            request_id = f"c{c}-t{turn}"
            engine.add_request(request_id, history[c], params)
            submitted[request_id] = time.perf_counter()
        outputs: dict[str, list[int]] = {}
        while engine.has_unfinished:
            for out in engine.step().outputs:
                if out.request_id not in first_seen:
                    first_seen[out.request_id] = time.perf_counter()
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        ttfts += [first_seen[r] - submitted[r] for r in submitted]
        for c in range(args.conversations):
            history[c] = history[c] + outputs[f"c{c}-t{turn}"]
    wall = time.perf_counter() - start
    s = engine.stats()
    tier = engine.host_tier
    ttfts.sort()
    return {
        "prefix_hit_rate": (s.num_prefix_hit_tokens - before.num_prefix_hit_tokens)
        / max(s.num_prefix_queried_tokens - before.num_prefix_queried_tokens, 1),
        "prefix_hit_tokens": s.num_prefix_hit_tokens - before.num_prefix_hit_tokens,
        "prompt_tokens": s.num_prefix_queried_tokens - before.num_prefix_queried_tokens,
        "ttft_mean_s": statistics.mean(ttfts),
        "ttft_p50_s": ttfts[len(ttfts) // 2],
        "ttft_p90_s": ttfts[int(len(ttfts) * 0.9)],
        "wall_s": wall,
        "gpu_blocks": engine.block_pool.num_blocks,
        "host_blocks": tier.num_blocks if tier else 0,
        "spilled_blocks": tier.num_spilled_blocks if tier else 0,
        "restored_blocks": tier.num_restored_blocks if tier else 0,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from splitserve.models.checkpoint_init import init_checkpoint

            model_dir = init_checkpoint(Path(tmp) / "model", args.arch, args.preset, dtype=args.dtype, seed=args.seed)
        results = {"args": {k: str(v) for k, v in vars(args).items()}, "device": args.device}
        if args.device.startswith("cuda"):
            results["gpu"] = torch.cuda.get_device_name()
        for mode in args.modes.split(","):
            engine = build_engine(args, model_dir, host=mode == "host")
            results[mode] = run(engine, args)
            print(mode, json.dumps(results[mode], indent=1), flush=True)
            del engine
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
