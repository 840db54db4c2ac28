"""Offline throughput of one engine: prefill, decode and total tokens/s, no server in the way.

Random prompts of --input-len token ids go straight into an ``LLMEngine`` (greedy,
``ignore_eos``, exactly --output-len new tokens each), at most --batch-size running at
once, and every ``step()`` is timed. A step that computes any prompt token counts as
prefill time; a step that only decodes counts as decode time. So

  prefill tokens/s = prompt tokens computed / time of the steps that computed them
  decode tokens/s  = tokens sampled in decode-only steps / time of those steps
  total tokens/s   = (prompt + output tokens) / wall time of the whole run

With --num-prompts equal to --batch-size and a token budget that holds every prompt
(the default), the run is one prefill step and --output-len - 1 decode steps, and the
two rates are clean. With more prompts than the batch, new prompts are prefilled
while others decode and those mixed steps count as prefill. The prefix cache is off,
so every prompt token is computed. A short warm-up request runs first, untimed.

    python bench/offline_throughput.py --arch llama --preset tiny --device cpu \\
        --batch-size 8 --input-len 128 --output-len 32 --out bench/results/offline_cpu.json
    python bench/offline_throughput.py --model checkpoints/llama-3.1-8b --device cuda \\
        --dtype bfloat16 --batch-size 64 --input-len 1024 --output-len 256

Without --model, a random-weight checkpoint of --arch/--preset is written to a temporary
directory first: the numbers then measure the engine, never the quality of a model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from splitserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="a local Hugging Face checkpoint directory")
    src.add_argument("--arch", choices=("llama", "qwen2", "qwen3", "mistral"), default="llama",
                     help="without --model: write a random checkpoint of this architecture (default llama)")
    p.add_argument("--preset", default="tiny", help="with --arch: the preset size (default tiny)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=8, help="requests running at once (max_num_seqs)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=32, help="new tokens per request")
    p.add_argument("--num-prompts", type=int, default=None, help="requests in all (default: --batch-size)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto",
                   help="schedule a step while the device runs the one before (auto: on a GPU)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget per step (default: room for a whole batch of prompts, at least 2048)")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks (default: enough for --batch-size full requests, so nothing is preempted)")
    p.add_argument("--seed", type=int, default=0, help="for the random prompts and the random checkpoint")
    p.add_argument("--repeat", type=int, default=1, help="timed runs; each metric is reported as the median over them")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    for name in ("batch_size", "input_len", "output_len", "block_size", "repeat"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    args.num_prompts = args.num_prompts or args.batch_size
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    return args


def build_engine(args: argparse.Namespace, model_dir: Path) -> LLMEngine:
    seq_len = args.input_len + args.output_len
    num_blocks = args.num_blocks or args.batch_size * -(-seq_len // args.block_size) + 1
    budget = args.max_num_batched_tokens or max(2048, args.batch_size * args.input_len)
    config = EngineConfig(
        model=ModelConfig(model_dir, dtype=args.dtype, device=args.device),
        cache=CacheConfig(block_size=args.block_size, num_blocks=num_blocks, enable_prefix_caching=False),
        scheduler=SchedulerConfig(
            max_num_seqs=args.batch_size,
            max_num_batched_tokens=budget,
            max_waiting=max(1024, args.num_prompts),
            max_tokens_limit=max(4096, args.output_len),
            async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
        ),
    )
    engine = LLMEngine(config)
    if seq_len > engine.max_model_len:
        raise SystemExit(f"--input-len + --output-len = {seq_len} is over the model's context {engine.max_model_len}")
    return engine


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_prompts(engine: LLMEngine, args: argparse.Namespace) -> tuple[list[int], list[list[int]]]:
    """A short warm-up prompt and --num-prompts random ones, EOS ids left out."""
    rng = random.Random(args.seed)
    vocab = [t for t in range(engine.vocab_size) if t not in engine.eos_token_ids]
    warmup = rng.choices(vocab, k=min(args.input_len, 16))
    return warmup, [rng.choices(vocab, k=args.input_len) for _ in range(args.num_prompts)]


def warm_up(engine: LLMEngine, prompt: list[int]) -> None:
    """Allocations, kernels and caches, untimed."""
    engine.add_request("warmup", prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished:
        engine.step()


def run(engine: LLMEngine, args: argparse.Namespace, prompts: list[list[int]], tag: str) -> dict:
    """One timed pass over every prompt; the engine is idle before and after."""
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    preemptions_before = engine.scheduler.num_preemptions
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    prefill_time = decode_time = 0.0
    num_prefill_steps = num_decode_steps = num_decode_tokens = num_output_tokens = 0
    prompt_tokens_before = engine.scheduler.num_prompt_tokens_computed
    sync(args.device)
    start = time.perf_counter()
    while engine.has_unfinished:
        prompt_before = engine.scheduler.num_prompt_tokens_computed
        t0 = time.perf_counter()
        result = engine.step()
        sync(args.device)
        elapsed = time.perf_counter() - t0
        num_tokens = sum(len(o.new_token_ids) for o in result.outputs)
        num_output_tokens += num_tokens
        if engine.scheduler.num_prompt_tokens_computed > prompt_before:
            prefill_time += elapsed
            num_prefill_steps += 1
        else:
            decode_time += elapsed
            num_decode_steps += 1
            num_decode_tokens += num_tokens
    wall = time.perf_counter() - start
    num_prompt_tokens = engine.scheduler.num_prompt_tokens_computed - prompt_tokens_before
    assert num_output_tokens == args.num_prompts * args.output_len, "every request generates --output-len tokens"
    num_preemptions = engine.scheduler.num_preemptions - preemptions_before

    return {
        "prompt_tokens": num_prompt_tokens,
        "output_tokens": num_output_tokens,
        "wall_s": wall,
        "prefill_s": prefill_time,
        "decode_s": decode_time,
        "prefill_steps": num_prefill_steps,
        "decode_steps": num_decode_steps,
        "preemptions": num_preemptions,
        "prefill_tokens_per_s": num_prompt_tokens / prefill_time if prefill_time else None,
        "decode_tokens_per_s": num_decode_tokens / decode_time if decode_time else None,
        "output_tokens_per_s": num_output_tokens / wall,
        "total_tokens_per_s": (num_prompt_tokens + num_output_tokens) / wall,
        "requests_per_s": args.num_prompts / wall,
        "mean_decode_step_ms": 1000 * decode_time / num_decode_steps if num_decode_steps else None,
    }


def median_results(runs: list[dict]) -> dict:
    """Each timing and rate as its median over the runs; counts are the same in every run."""
    return {
        key: statistics.median(r[key] for r in runs) if isinstance(value, float) else value
        for key, value in runs[0].items()
    }


def environment(args: argparse.Namespace, engine: LLMEngine) -> dict:
    env = {
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(engine.runner.dtype).removeprefix("torch."),
        "attention_backend": engine.runner.backend.name,
        "num_blocks": engine.block_pool.num_blocks,
        "max_num_batched_tokens": engine.config.scheduler.max_num_batched_tokens,
    }
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def print_table(results: dict, args: argparse.Namespace, model: str) -> None:
    print(f"\nmodel {model} | device {args.device} | batch {args.batch_size} | "
          f"input {args.input_len} | output {args.output_len} | prompts {args.num_prompts} | "
          f"median of {args.repeat} run{'s' if args.repeat > 1 else ''}")
    rows = [
        ("prefill tokens/s", results["prefill_tokens_per_s"], f"{results['prompt_tokens']} tokens in {results['prefill_s']:.3f} s, {results['prefill_steps']} steps"),
        ("decode tokens/s", results["decode_tokens_per_s"], f"{results['decode_steps']} steps, {results['mean_decode_step_ms'] or 0:.2f} ms each"),
        ("output tokens/s", results["output_tokens_per_s"], f"{results['output_tokens']} tokens over the whole run"),
        ("total tokens/s", results["total_tokens_per_s"], f"prompt + output over {results['wall_s']:.3f} s wall"),
        ("requests/s", results["requests_per_s"], ""),
    ]
    print(f"{'metric':<18}{'value':>12}  note")
    for name, value, note in rows:
        shown = f"{value:12.1f}" if value is not None else f"{'n/a':>12}"
        print(f"{name:<18}{shown}  {note}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with ExitStack() as stack:
        if args.model is not None:
            model_dir, model = args.model, str(args.model)
        else:
            from splitserve.models.checkpoint_init import init_checkpoint

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="splitserve-bench-")))
            model_dir = init_checkpoint(tmp / "model", args.arch, args.preset, dtype=args.dtype, seed=args.seed)
            model = f"random {args.arch}/{args.preset}"
        engine = build_engine(args, model_dir)
        warmup, prompts = make_prompts(engine, args)
        warm_up(engine, warmup)
        env = environment(args, engine)
        runs = [run(engine, args, prompts, f"run{i}") for i in range(args.repeat)]
        results = median_results(runs)
    print_table(results, args, model)
    if args.out is not None:
        record = {
            "schema": "splitserve.bench.offline_throughput/1",
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else " ".join(argv),
            "model": model,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "environment": env,
            "results": results,
            "runs": runs,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
