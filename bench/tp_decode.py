"""Decode step time at several TP sizes, the all-reduce share of the step, and a TP exactness check.

Three parts, each optional:

  --check        tiny fp32 checkpoints of --check-archs: greedy tokens of TP=2 (TPModelRunner,
                 one rank process) equal TP=1's, and the max logit difference of one prefill.
  step time      --preset (random weights of the real shape, bf16, written on this machine) at
                 each --tp-sizes and --batch-sizes: a decode-only step of B requests with
                 --context tokens each through ``execute`` as the engine calls it (rank 0
                 sends STEP, every rank runs its shard, greedy argmax read back to the host).
  collectives    what the TP step's collectives alone take, in a fresh process group of the
                 same size: per layer two all-reduces of [B, hidden] (attention output and
                 MLP down projection), one for the embedding and one all-gather of the logits,
                 replayed as a CUDA graph (as the decode step runs them) and timed with events.
                 Their time over the step time is the all-reduce share.

    python bench/tp_decode.py --check --preset llama-3.1-8b --tp-sizes 1 2 --batch-sizes 1 64 \\
        --context 1024 --out bench/results/tp_h200x2.json
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

from splitserve.bench.timing import median_ms
from splitserve.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from splitserve.models.arch import load_arch_config
from splitserve.parallel import TPModelRunner

BLOCK_SIZE = 16
CHECK_PROMPTS = [list(range(3, 103)), [5, 9, 11, 200], list(range(300, 333))]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--check", action="store_true", help="TP=2 against TP=1 on tiny fp32 checkpoints")
    p.add_argument("--check-archs", nargs="+", default=["llama", "qwen2", "qwen3", "mistral"])
    p.add_argument("--preset", default=None, help="shape to time, e.g. llama-3.1-8b (none: no step timing)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count (quick runs)")
    p.add_argument("--tp-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--checkpoint-dir", type=Path, default=Path(tempfile.gettempdir()) / "splitserve-tp-bench")
    p.add_argument("--out", type=Path)
    p.add_argument("--no-collectives", action="store_true", help="skip the collectives-alone measurement")
    p.add_argument("--collectives-only", action="store_true", help="only the collectives (no step timing, no share)")
    p.add_argument("--watchdog-s", type=float, default=0, help="print every thread's stack every N s (finds hangs)")
    return p.parse_args(argv)


def checkpoint(arch: str, preset: str, root: Path, device: str, overrides: dict | None = None) -> tuple[Path, float]:
    from splitserve.models.checkpoint_init import init_checkpoint

    suffix = "".join(f"-{k}{v}" for k, v in (overrides or {}).items())
    path = root / f"{arch}-{preset}{suffix}"
    if (path / "config.json").exists():
        return path, 0.0
    start = time.perf_counter()
    init_checkpoint(path, arch, preset, device="cuda" if device.startswith("cuda") else "cpu", overrides=overrides)
    return path, time.perf_counter() - start


def make_runner(model_dir: Path, tp_size: int, device: str, dtype, num_blocks: int):
    model = ModelConfig(model_dir, dtype=dtype, device=device)
    cache = CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks)
    if tp_size == 1:
        return ModelRunner(model, cache)
    return TPModelRunner(model, cache, ParallelConfig(tp_size))


def close(runner) -> None:
    if isinstance(runner, TPModelRunner):
        runner.close()


# -- exactness -------------------------------------------------------------------------


def greedy(model_dir: Path, runner) -> list[list[int]]:
    engine = LLMEngine(
        EngineConfig(
            model=ModelConfig(model_dir, dtype=torch.float32),
            cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=runner.num_blocks),
            scheduler=SchedulerConfig(max_num_batched_tokens=64),
        ),
        runner,
    )
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(CHECK_PROMPTS):
        engine.add_request(str(i), prompt, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished:
        for out in engine.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return [tokens[str(i)] for i in range(len(CHECK_PROMPTS))]


def prefill_logits(runner) -> torch.Tensor:
    prompt = CHECK_PROMPTS[0]
    blocks = list(range(-(-len(prompt) // BLOCK_SIZE)))
    return runner.execute(SchedulerOutput([ScheduledRequest("r", prompt, 0, blocks, True)])).float().cpu()


def check(args) -> list[dict]:
    results = []
    for arch in args.check_archs:
        model_dir, _ = checkpoint(arch, "tiny", args.checkpoint_dir, args.device)
        outputs = {}
        try:
            # TP=2 first, as on the 2x H200 runs that hung (bench/results/tp_h200x2.md): the
            # likely cause, graphs holding NCCL communicators at teardown, is fixed since.
            for tp_size in (2, 1):
                runner = make_runner(model_dir, tp_size, args.device, torch.float32, num_blocks=64)
                try:
                    outputs[tp_size] = (greedy(model_dir, runner), prefill_logits(runner))
                finally:
                    close(runner)
        except Exception as e:  # one run of a scarce machine: record it, go on with the rest
            print(f"check {arch} failed: {type(e).__name__}: {e}", flush=True)
            results.append({"arch": arch, "token_exact": False, "error": f"{type(e).__name__}: {e}"})
            continue
        (tokens1, logits1), (tokens2, logits2) = outputs[1], outputs[2]
        row = {
            "arch": arch,
            "token_exact": tokens1 == tokens2,
            "num_tokens": sum(map(len, tokens1)),
            "max_logit_diff": float((logits1 - logits2).abs().max()),
        }
        print(f"check {arch}: TP=2 tokens {'==' if row['token_exact'] else '!='} TP=1 ({row['num_tokens']} tokens), "
              f"max |logit diff| {row['max_logit_diff']:.2e}", flush=True)
        results.append(row)
    return results


# -- step time -------------------------------------------------------------------------


def decode_batch(batch: int, context: int, num_blocks: int, rng: random.Random) -> SchedulerOutput:
    """B requests with ``context`` tokens each, the last one computed now, in random blocks."""
    per = -(-context // BLOCK_SIZE)
    blocks = rng.sample(range(num_blocks), batch * per)
    return SchedulerOutput(
        [ScheduledRequest(f"b{i}", [rng.randrange(3, 1000)], context - 1, blocks[i * per : (i + 1) * per], True) for i in range(batch)]
    )





def step_times(args) -> tuple[list[dict], dict]:
    overrides = {"num_hidden_layers": args.layers} if args.layers else None
    model_dir, init_s = checkpoint("llama", args.preset, args.checkpoint_dir, args.device, overrides)
    print(f"checkpoint {model_dir} ({init_s:.1f}s to write)", flush=True)
    per = -(-args.context // BLOCK_SIZE)
    num_blocks = max(args.batch_sizes) * per + 16
    rows = []
    for tp_size in args.tp_sizes:
        start = time.perf_counter()
        try:
            runner = make_runner(model_dir, tp_size, args.device, torch.bfloat16, num_blocks)
        except Exception as e:
            print(f"  TP={tp_size} failed to start: {type(e).__name__}: {e}", flush=True)
            continue
        load_s = time.perf_counter() - start
        try:
            for batch in args.batch_sizes:
                out = decode_batch(batch, args.context, num_blocks, random.Random(batch))
                ms = median_ms(lambda: runner.execute(out).argmax(-1).tolist(), args.iters)
                rows.append({"tp_size": tp_size, "batch": batch, "context": args.context, "step_ms": round(ms, 3),
                             "tokens_per_s": round(batch / ms * 1e3, 1), "load_s": round(load_s, 1)})
                print(f"  TP={tp_size} batch {batch:3d} context {args.context}: {ms:.3f} ms/step", flush=True)
        except Exception as e:
            print(f"  TP={tp_size} failed: {type(e).__name__}: {e}", flush=True)
        finally:
            close(runner)
    return rows, {"model_dir": str(model_dir), "checkpoint_init_s": round(init_s, 1)}


# -- collectives alone -----------------------------------------------------------------


def _collectives_rank(rank: int, world: int, port: int, shapes: dict, batch_sizes: list[int], device: str, out_path: str) -> None:
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    dev = torch.device(f"cuda:{rank}" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120), device_id=dev if cuda else None)
    results = []
    num_all_reduces = 2 * shapes["num_layers"] + 1
    for batch in batch_sizes:
        hidden = torch.randn(batch, shapes["hidden_size"], dtype=torch.bfloat16, device=dev)
        logits = torch.randn(batch, -(-shapes["vocab_size"] // world), dtype=torch.bfloat16, device=dev)
        parts = [torch.empty_like(logits) for _ in range(world)]

        def step():
            for _ in range(num_all_reduces):
                dist.all_reduce(hidden)
            dist.all_gather(parts, logits)

        if cuda:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            eager_ms = median_ms(lambda: (step(), torch.cuda.synchronize()), 10)
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                calls = 20
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                graph.replay()
                dist.barrier()
                torch.cuda.synchronize()
                start.record()
                for _ in range(calls):
                    graph.replay()
                end.record()
                end.synchronize()
                graph_ms = start.elapsed_time(end) / calls
                del graph  # a graph holding collectives keeps destroy_process_group waiting (NCCL >= 2.26)
            except Exception as e:  # record it; the eager number still stands
                print(f"rank {rank}: capturing the collectives failed: {e}", flush=True)
                graph_ms = None
        else:
            graph_ms = None
            eager_ms = median_ms(step, 10)
        results.append({"batch": batch, "all_reduces_per_step": num_all_reduces, "graph_ms": graph_ms, "eager_ms": round(eager_ms, 3),
                        "all_reduce_bytes": batch * shapes["hidden_size"] * 2})
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def collectives(args, model_dir: Path, world: int) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    arch = load_arch_config(model_dir)
    shapes = {"num_layers": arch.num_layers, "hidden_size": arch.hidden_size, "vocab_size": arch.vocab_size}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.start_processes(_collectives_rank, args=(world, port, shapes, args.batch_sizes, args.device, f.name), nprocs=world, start_method="spawn")
        return json.loads(Path(f.name).read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.watchdog_s > 0:
        faulthandler.dump_traceback_later(args.watchdog_s, repeat=True)
    report: dict = {"command": "python " + " ".join(sys.argv), "device": args.device, "torch": torch.__version__, "host": platform.node()}
    if args.device.startswith("cuda"):
        report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if args.check:
        report["check"] = check(args)
    if args.preset and args.collectives_only:
        model_dir, _ = checkpoint("llama", args.preset, args.checkpoint_dir, args.device,
                                  {"num_hidden_layers": args.layers} if args.layers else None)
        report["collectives"] = {}
        for tp_size in [t for t in args.tp_sizes if t > 1]:
            report["collectives"][tp_size] = coll = collectives(args, model_dir, tp_size)
            for c in coll:
                print(f"  TP={tp_size} batch {c['batch']:3d}: collectives {c['graph_ms']} ms in a graph, "
                      f"{c['eager_ms']:.3f} ms eager", flush=True)
    elif args.preset:
        rows, info = step_times(args)
        report.update(info, steps=rows)
        tp_sizes = [] if args.no_collectives else [t for t in args.tp_sizes if t > 1]
        report["collectives"] = {}
        for tp_size in tp_sizes:
            try:
                coll = collectives(args, Path(info["model_dir"]), tp_size)
            except Exception as e:
                print(f"  collectives at TP={tp_size} failed: {type(e).__name__}: {e}", flush=True)
                continue
            report["collectives"][tp_size] = coll
            for c in coll:
                step = next((r for r in rows if r["tp_size"] == tp_size and r["batch"] == c["batch"]), None)
                if step is None:
                    continue
                ms = c["graph_ms"] if c["graph_ms"] is not None else c["eager_ms"]
                c["share_of_step"] = round(ms / step["step_ms"], 3)
                print(f"  TP={tp_size} batch {c['batch']:3d}: collectives {ms:.3f} ms of {step['step_ms']:.3f} ms/step "
                      f"({100 * c['share_of_step']:.0f}%); eager {c['eager_ms']:.3f} ms", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    ok = all(r["token_exact"] for r in report.get("check", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
