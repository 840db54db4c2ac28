"""Speculative decoding against plain decoding, offline, one engine: speedup, acceptance, step floor.

For each batch size (all requests start together, greedy, ``ignore_eos``, exactly
--output-len new tokens each) and each mode, the decode phase is timed (from the step after
the one that finished every prompt to the last token) and reported as ms per output token
of one request (``itl_ms``) and output tokens/s of the batch; speedup is plain decoding's
``itl_ms`` over the mode's, at the same batch size. Modes:

  plain-async   no speculation, async scheduling (the GPU default)
  plain-sync    no speculation, synchronous steps (speculative steps are synchronous)
  draft-self    the draft is the target itself: every proposal agrees by construction; the
                mechanism's ceiling (and the draft's full cost)
  draft-layers  the target's first --draft-layers layers (the same seed shares them), its own head
  draft-other   a draft of other weights (seed 1): about 0% accepted, the overhead of checking
  ngram-copy    prompt lookup on a copy-heavy workload: each prompt repeats a passage
  ngram-random  prompt lookup on random prompts (few proposals: the cost of looking)

For the draft modes, the cost of giving the decode worker the draft's KV of a prompt is printed
both ways it could be paid: ``rebuild_ms``, the draft's prefill of the batch's prompts on this
device (what the decode worker does now), and ``draft_kv_bytes``, what a prefill worker would
have to send instead; divide by the KV transfer rate bench/kv_transfer.py measures between the
same GPUs to compare (docs/speculative_decoding.md).

The step floor is the target's weight bytes over the device's copy bandwidth (read + write,
as bench/gpu_decode.py measures it) / 2: a decode step must read every weight once.
Random weights: acceptance of the draft-layers and ngram modes says what these random models
do, not what a trained draft would; draft-self and draft-other bound the mechanism.

    python bench/spec_decode.py --preset tiny --device cpu --batch-sizes 1 8 --output-len 32
    python bench/spec_decode.py --preset llama-3.1-8b --device cuda --batch-sizes 1 8 32 --out r.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from splitserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.models.checkpoint_init import init_checkpoint

MODES = ("plain-async", "plain-sync", "draft-self", "draft-layers", "draft-other", "ngram-copy", "ngram-random")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--arch", default="llama")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--checkpoints", type=Path, default=None, help="where the random checkpoints are written (default: a temporary folder)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--draft-layers", type=int, default=2)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--kv-cache-gb", type=float, default=None, help="the target's KV budget (a draft gets as many blocks)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def copy_bandwidth(device: str) -> float | None:
    if device != "cuda":
        return None
    x = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    end.synchronize()
    return 2 * x.numel() * x.element_size() * 20 / (start.elapsed_time(end) * 1e-3)


def checkpoints(args, root: Path) -> dict[str, Path]:
    device = "cuda" if args.device == "cuda" else "cpu"

    def make(name: str, **kw) -> Path:
        path = root / f"{args.arch}-{args.preset}-{name}"
        if not (path / "config.json").exists():
            init_checkpoint(path, args.arch, args.preset, device=device, **kw)
        return path

    return {
        "target": make("target"),
        "layers": make(f"first{args.draft_layers}", overrides={"num_hidden_layers": args.draft_layers}),
        "other": make(f"other{args.draft_layers}", seed=1, overrides={"num_hidden_layers": args.draft_layers}),
    }


def prompts(mode: str, batch: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(batch):
        if mode == "ngram-copy":  # a passage, then the passage again and again: the output is likely to continue it
            passage = [rng.randrange(3, vocab) for _ in range(max(8, input_len // 4))]
            out.append((passage * 4)[:input_len])
        else:
            out.append([rng.randrange(3, vocab) for _ in range(input_len)])
    return out


def engine_for(mode: str, args, paths: dict[str, Path], batch: int) -> LLMEngine:
    k = args.num_speculative_tokens
    spec = {
        "plain-async": SpeculativeConfig(), "plain-sync": SpeculativeConfig(),
        "draft-self": SpeculativeConfig("draft", k, paths["target"]),
        "draft-layers": SpeculativeConfig("draft", k, paths["layers"]),
        "draft-other": SpeculativeConfig("draft", k, paths["other"]),
        "ngram-copy": SpeculativeConfig("ngram", k), "ngram-random": SpeculativeConfig("ngram", k),
    }[mode]
    cache = CacheConfig(block_size=16, kv_cache_bytes=int((args.kv_cache_gb or (16 if args.device == "cuda" else 0.25)) * 2**30))
    return LLMEngine(
        EngineConfig(
            model=ModelConfig(paths["target"], device=args.device),
            cache=cache,
            scheduler=SchedulerConfig(
                max_num_seqs=batch, max_num_batched_tokens=max(2048, batch * args.input_len),
                async_scheduling=mode == "plain-async",  # speculative engines run synchronous steps whatever this says
            ),
            speculative=spec,
        )
    )


def draft_rebuild(engine: LLMEngine, batch: int, input_len: int, device: str) -> dict:
    """The draft's prefill of ``batch`` prompts of ``input_len`` tokens (median of 3), and their KV bytes."""
    from splitserve.engine.scheduler import ScheduledRequest, SchedulerOutput

    runner = engine.speculative.draft.runner
    per = -(-input_len // runner.block_size)
    if per * batch > runner.num_blocks:
        return {}
    out = SchedulerOutput([
        ScheduledRequest(f"rebuild{i}", [3 + (i + t) % 100 for t in range(input_len)], 0, list(range(i * per, (i + 1) * per)), sample=True)
        for i in range(batch)
    ])
    times = []
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        runner.execute(out)
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"rebuild_ms": sorted(times)[1], "draft_kv_bytes": per * batch * runner.block_bytes}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(engine: LLMEngine, batch_prompts: list[list[int]], output_len: int, device: str) -> dict:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.add_request("warmup", batch_prompts[0][:32], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished:
        engine.step()
    before = engine.stats().spec
    for i, prompt in enumerate(batch_prompts):
        engine.add_request(f"r{i}", prompt, params)
    first: dict[str, float] = {}
    produced = 0
    decode_start = None
    steps = 0
    while engine.has_unfinished:
        outputs = engine.step().outputs
        for out in outputs:
            first.setdefault(out.request_id, 1.0)
            produced += len(out.new_token_ids)
        if decode_start is None and len(first) == len(batch_prompts):
            sync(device)
            decode_start, decode_tokens_before = time.perf_counter(), produced
        elif decode_start is not None:
            steps += 1
    sync(device)
    seconds = time.perf_counter() - decode_start
    tokens = produced - decode_tokens_before
    spec = engine.stats().spec
    result = {
        "decode_seconds": seconds,
        "decode_tokens": tokens,
        "decode_steps": steps,
        "output_tok_per_s": tokens / seconds,
        "itl_ms": seconds * 1e3 / (tokens / len(batch_prompts)),
        "step_ms": seconds * 1e3 / max(steps, 1),
    }
    if spec is not None:
        drafted = spec.num_draft_tokens - (before.num_draft_tokens if before else 0)
        accepted = spec.num_accepted_tokens - (before.num_accepted_tokens if before else 0)
        checks = spec.num_verifications - (before.num_verifications if before else 0)
        result.update(
            num_draft_tokens=drafted, num_accepted_tokens=accepted, num_verifications=checks,
            acceptance_rate=accepted / drafted if drafted else None,
            mean_accepted_length=1 + accepted / checks if checks else None,
        )
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    root = args.checkpoints or Path(tempfile.mkdtemp(prefix="spec-bench-"))
    paths = checkpoints(args, root)
    bandwidth = copy_bandwidth(args.device)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "copy_bandwidth_gbps": bandwidth / 1e9 if bandwidth else None, "runs": []}
    for batch in args.batch_sizes:
        base = None
        for mode in args.modes:
            engine = engine_for(mode, args, paths, batch)
            if bandwidth and "weight_bytes" not in results:
                weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
                results["weight_bytes"] = weight_bytes
                results["step_floor_ms"] = weight_bytes / (bandwidth / 2) * 1e3  # read once per step
            rebuild = draft_rebuild(engine, batch, args.input_len, args.device) if mode.startswith("draft") else {}
            r = measure(engine, prompts(mode, batch, args.input_len, engine.vocab_size, seed=batch), args.output_len, args.device)
            r.update(mode=mode, batch=batch, **rebuild)
            if mode == "plain-async" or (mode == "plain-sync" and base is None):
                base = r["itl_ms"]  # the baseline: async plain decoding, else sync
            r["speedup_vs_plain"] = base / r["itl_ms"] if base else None
            results["runs"].append(r)
            acc = f", acceptance {r['acceptance_rate']:.3f}, mean accepted length {r['mean_accepted_length']:.2f}" if r.get("acceptance_rate") is not None else ""
            print(f"batch {batch:3d} {mode:13s} itl {r['itl_ms']:8.3f} ms  step {r['step_ms']:8.3f} ms  "
                  f"{r['output_tok_per_s']:9.1f} tok/s  speedup {r['speedup_vs_plain'] or 0:5.2f}{acc}", flush=True)
            if rebuild:
                print(f"          draft KV of the batch's prompts: rebuild {rebuild['rebuild_ms']:.2f} ms here, "
                      f"or {rebuild['draft_kv_bytes'] / 2**20:.1f} MiB to transfer", flush=True)
            del engine
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if "step_floor_ms" in results:
        print(f"# copy bandwidth {results['copy_bandwidth_gbps']:.0f} GB/s; step floor (weights read once) {results['step_floor_ms']:.2f} ms")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
