"""Engine decode step time with 0%, 50% and 100% of a batch's requests grammar-constrained.

For each preset (random weights of the real shape, bf16, written to --checkpoint-dir), batch
size and constrained share, B requests of --prompt tokens decode --steps tokens through
``LLMEngine.step()`` with async scheduling (greedy, so sampling stays on the device). The
constrained ones follow a grammar of JSON records that never completes (``[{...},{...},...``
with no way to end), so every request runs to --steps and the batch stays whole; each
step fills one xgrammar bitmask per constrained request on the host, after the previous
step's tokens are read back, while the device runs this step's forward. Reported per point:
the median step (ms), its ratio to the unconstrained step, tokens/s, and the steps that fell
back to host sampling (must be 0: async scheduling stays on).

    python bench/gpu_structured_step.py --presets llama-3.2-1b llama-3.1-8b --batch-sizes 64 256 \\
        --fractions 0 0.5 1 --out $OUT/structured_step.json
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from splitserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from splitserve.engine.constraint import Constraint
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams

BLOCK_SIZE = 16
# JSON-like records, one after another, right-recursive without an end: the grammar never completes.
RECORDS = r'''root ::= "[" items
items ::= record "," items
record ::= "{\"id\": " [1-9] [0-9]{0,5} ", \"name\": \"" [a-zA-Z ]{1,16} "\", \"score\": " [0-9]{1,3} "." [0-9]{1,2} ", \"ok\": " ("true" | "false") "}"'''


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["llama-3.2-1b"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens per request")
    p.add_argument("--steps", type=int, default=96, help="decode steps per request")
    p.add_argument("--checkpoint-dir", type=Path, default=Path("/dev/shm/splitserve-bench"))
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (use --presets tiny)")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def checkpoint(preset: str, root: Path, device: str) -> Path:
    from splitserve.models.checkpoint_init import init_checkpoint

    path = root / preset
    if not (path / "config.json").exists():
        init_checkpoint(path, "llama", preset, device=device)
    return path


def measure(model_dir: Path, batch: int, fraction: float, args, rng: random.Random) -> dict:
    context = args.prompt + args.steps
    config = EngineConfig(
        model=ModelConfig(model_dir, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32, device=args.device,
                          max_model_len=context + BLOCK_SIZE),
        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=batch * (-(-context // BLOCK_SIZE) + 1) + 16, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=batch * args.prompt, max_tokens_limit=max(4096, args.steps),
                                  async_scheduling=True),
    )
    engine = LLMEngine(config)
    constraint = Constraint.grammar(RECORDS)
    num_constrained = round(batch * fraction)
    for i in range(batch):
        params = SamplingParams(max_tokens=args.steps, temperature=0.0, constraint=constraint if i < num_constrained else None,
                                ignore_eos=i >= num_constrained)
        engine.add_request(f"r{i}", [rng.randrange(3, 1000) for _ in range(args.prompt)], params)
    times, finished = [], 0
    while engine.has_unfinished:
        start = time.perf_counter()
        result = engine.step()
        times.append(time.perf_counter() - start)
        finished += sum(o.finished for o in result.outputs)
    assert engine.scheduler.num_preemptions == 0, "the batch did not fit its KV blocks"
    timed = times[3:-3]  # past the prefill step and the steps around it, before the batch drains
    step_ms = statistics.median(timed) * 1e3
    row = {"batch": batch, "constrained_fraction": fraction, "num_constrained": num_constrained, "step_ms": step_ms,
           "p90_step_ms": sorted(timed)[int(0.9 * (len(timed) - 1))] * 1e3, "tokens_per_s": batch / step_ms * 1e3,
           "decode_steps": len(timed), "host_sampled_steps": engine.num_host_sampled_steps, "async_scheduling": engine.async_scheduling}
    print(f"  batch {batch}, {fraction:.0%} constrained: {step_ms:.2f} ms/step (p90 {row['p90_step_ms']:.2f}), "
          f"{row['tokens_per_s']:.0f} tok/s, host-sampled steps {engine.num_host_sampled_steps}", flush=True)
    del engine
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> None:
    args = parse_args(argv)
    rng = random.Random(0)
    results = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "host": platform.node(), "args": vars(args) | {
        "checkpoint_dir": str(args.checkpoint_dir), "out": str(args.out)}, "presets": []}
    for preset in args.presets:
        print(preset, flush=True)
        model_dir = checkpoint(preset, args.checkpoint_dir, args.device)
        rows = []
        for batch in args.batch_sizes:
            for fraction in args.fractions:
                rows.append(measure(model_dir, batch, fraction, args, rng))
            base = next((r["step_ms"] for r in rows if r["batch"] == batch and r["constrained_fraction"] == 0.0), None)
            for r in rows:
                if r["batch"] == batch and base:
                    r["vs_unconstrained"] = r["step_ms"] / base
        results["presets"].append({"preset": preset, "rows": rows})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
