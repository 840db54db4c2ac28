"""The host's share of a constrained decode step, as the engine pays it: ``GrammarMatchers.constrain``
(xgrammar's batched mask fill on the host's threads, then the bitmask applied to the logits;
``fill_ms`` times the fill alone, the part that is host work on a GPU machine too) and the
accept of each sampled token, for a batch of B requests of which a share is constrained.

With async scheduling this runs while the device computes the step's forward, so it is hidden
when it is shorter than the device step (bench/gpu_structured_step.py measures that on a GPU).
Here the logits live on the CPU, so the apply is the CPU's; the fill and accept are the same
host work as on a GPU machine. Greedy tokens under the mask drive the matchers, through the
never-ending JSON-records grammar of gpu_structured_step.py.

    python bench/grammar_batch_cpu.py --vocab 128256 --batch-sizes 64 256 --out bench/results/grammar_batch_cpu
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import xgrammar as xgr

from splitserve.engine.constraint import Constraint
from splitserve.engine.grammar import GrammarCompiler, GrammarMatchers
from splitserve.engine.request import Request
from splitserve.engine.sampling_params import SamplingParams

RECORDS = r'''root ::= "[" items
items ::= record "," items
record ::= "{\"id\": " [1-9] [0-9]{0,5} ", \"name\": \"" [a-zA-Z ]{1,16} "\", \"score\": " [0-9]{1,3} "." [0-9]{1,2} ", \"ok\": " ("true" | "false") "}"'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from splitserve.models.tokenizer_build import build_tokenizer

    tokenizer = build_tokenizer(args.vocab, arch="llama")
    compiler = GrammarCompiler(tokenizer, args.vocab, [tokenizer.eos_token_id])
    constraint = Constraint.grammar(RECORDS)
    torch.manual_seed(0)
    rows = []
    for batch in args.batch_sizes:
        for fraction in args.fractions:
            matchers = GrammarMatchers(compiler, max_threads=args.threads)
            num_constrained = round(batch * fraction)
            requests = [Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=10_000, temperature=0.0,
                                                                      constraint=constraint if i < num_constrained else None))
                        for i in range(batch)]
            logits = torch.randn(batch, args.vocab)
            constrain_s, accept_s, fill_s = [], [], []
            filler, bitmask = xgr.BatchGrammarMatcher(args.threads), xgr.allocate_token_bitmask(batch, args.vocab)
            for _ in range(args.steps):
                constrained = [matchers.matcher(r) for r in requests[:num_constrained]]
                t = time.perf_counter()
                filler.batch_fill_next_token_bitmask(constrained, bitmask, list(range(num_constrained)))  # the fill alone
                fill_s.append(time.perf_counter() - t)
                t0 = time.perf_counter()
                masked = matchers.constrain(logits, requests)
                t1 = time.perf_counter()
                tokens = masked.argmax(-1).tolist()
                t2 = time.perf_counter()
                for request, token in zip(requests[:num_constrained], tokens):
                    request.append_output(token)
                    matchers.accept(request, token)
                accept_s.append(time.perf_counter() - t2)
                constrain_s.append(t1 - t0)
                logits = torch.randn(batch, args.vocab)  # fresh random logits each step, as a random model gives
            row = {"vocab": args.vocab, "batch": batch, "constrained_fraction": fraction, "num_constrained": num_constrained,
                   "threads": args.threads, "fill_ms_median": statistics.median(fill_s) * 1e3, "constrain_ms_median": statistics.median(constrain_s) * 1e3,
                   "accept_ms_median": statistics.median(accept_s) * 1e3, "steps": args.steps}
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"command": "python bench/grammar_batch_cpu.py " + " ".join(
            [f"--vocab {args.vocab}", "--batch-sizes", *map(str, args.batch_sizes), f"--steps {args.steps}", f"--threads {args.threads}"]),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
