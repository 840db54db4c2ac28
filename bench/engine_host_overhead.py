"""Host time of one engine step at a given decode batch, with the model taken out.

The model's forward is replaced by a stand-in that returns logits of the right
shape, so what is timed is what the CPU does around every GPU step: scheduling,
building inputs, sampling (greedy), and bookkeeping. On a GPU this time is paid
every step unless it overlaps the GPU's work.

    python bench/engine_host_overhead.py --model DIR --batch 256 --steps 50
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from splitserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = EngineConfig(
        model=ModelConfig(args.model),
        cache=CacheConfig(num_blocks=args.batch * (args.prompt_len + args.steps + 64) // 16 + 64),
        scheduler=SchedulerConfig(max_num_seqs=args.batch, max_num_batched_tokens=max(8192, args.batch)),
    )
    engine = LLMEngine(config)
    vocab = engine.vocab_size
    # Stand-in for the model: right-shaped logits, no arithmetic.
    engine.runner.execute = lambda out: torch.zeros(sum(s.sample for s in out.scheduled), vocab)
    params = SamplingParams(max_tokens=args.steps + 32, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"r{i}", [3 + (i * 7 + j) % 500 for j in range(args.prompt_len)], params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
        engine.step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    times.sort()
    result = {"batch": args.batch, "prompt_len": args.prompt_len, "steps": args.steps,
              "median_ms": times[len(times) // 2] * 1e3, "p90_ms": times[int(len(times) * 0.9)] * 1e3}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
