"""Per-step token-mask cost of xgrammar and llguidance on this machine's CPU.

Each library drives a seeded random walk through the same grammars (a JSON schema, any JSON
object, a regex) over a locally trained byte-level BPE tokenizer: every step fills the
vocabulary bitmask for one request, picks an allowed token and advances the matcher. Reported
per grammar: compile time, and the median / p99 time of one mask fill and of one accept. The
engine fills one mask per constrained request per step, so this is the host cost it must hide
behind the device's step.

    python bench/grammar_mask_cpu.py --vocab 32768 128256 --out bench/results/grammar_mask_cpu
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

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        "kind": {"enum": ["person", "robot", "other"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}, "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "tags", "kind", "address"],
}
REGEX = r"(\+1 )?\(?[0-9]{3}\)? [0-9]{3}-[0-9]{4}( ext\. [0-9]{1,4})?"
GRAMMARS = {"json_schema": ("schema", SCHEMA), "json_object": ("object", None), "regex": ("regex", REGEX)}


def _pick(allowed: torch.Tensor, rng: random.Random, vocab: int) -> int:
    bits = allowed.view(torch.int32).view(torch.uint8).numpy()  # little-endian: bit i of word w is token 32w + i
    ids = [i for i in range(vocab) if bits[i >> 3] >> (i & 7) & 1]
    return rng.choice(ids)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[tokenizer.eos_token_id])
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab)

    def compile(self, kind: str, spec):
        if kind == "schema":
            return self.compiler.compile_json_schema(json.dumps(spec), any_whitespace=False)
        if kind == "object":
            return self.compiler.compile_builtin_json_grammar()
        return self.compiler.compile_regex(spec)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher) -> torch.Tensor:
        matcher.fill_next_token_bitmask(self.bitmask, 0)
        return self.bitmask[0]

    def accept(self, matcher, token: int) -> None:
        assert matcher.accept_token(token)

    def done(self, matcher) -> bool:
        return matcher.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
        self.fill_fn = llguidance.torch.fill_next_token_bitmask

    def compile(self, kind: str, spec):
        M = self.llg.LLMatcher
        if kind == "schema":
            grammar = M.grammar_from_json_schema(json.dumps(spec), defaults={"whitespace_flexible": False})
        elif kind == "object":
            grammar = M.grammar_from_json_schema('{"type": "object"}', defaults={"whitespace_flexible": False})
        else:
            grammar = M.grammar_from_regex(spec)
        M(self.tokenizer, grammar)  # the first matcher compiles the grammar's lexer
        return grammar

    def matcher(self, grammar):
        return self.llg.LLMatcher(self.tokenizer, grammar)

    def fill(self, matcher) -> torch.Tensor:
        self.fill_fn(matcher, self.bitmask, 0)
        return self.bitmask[0]

    def accept(self, matcher, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()

    def done(self, matcher) -> bool:
        return matcher.is_stopped()


def walk(lib, compiled, vocab: int, eos: int, seed: int, max_steps: int) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    matcher = lib.matcher(compiled)
    fills, accepts = [], []
    for _ in range(max_steps):
        t0 = time.perf_counter()
        mask = lib.fill(matcher)
        t1 = time.perf_counter()
        fills.append(t1 - t0)
        token = _pick(mask, rng, vocab)
        t2 = time.perf_counter()
        lib.accept(matcher, token)
        accepts.append(time.perf_counter() - t2)
        if token == eos or lib.done(matcher):
            break
    return fills, accepts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768])
    ap.add_argument("--walks", type=int, default=8)
    ap.add_argument("--max-steps", type=int, default=120)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from splitserve.models.tokenizer_build import build_tokenizer

    torch.set_num_threads(1)
    rows = []
    for vocab in args.vocab:
        tokenizer = build_tokenizer(vocab, arch="llama")
        eos = tokenizer.eos_token_id
        for lib_cls in (XGrammar, LLGuidance):
            lib = lib_cls(tokenizer, vocab)
            for gname, (kind, spec) in GRAMMARS.items():
                t0 = time.perf_counter()
                compiled = lib.compile(kind, spec)
                compile_ms = (time.perf_counter() - t0) * 1e3
                fills, accepts = [], []
                for seed in range(args.walks):
                    f, a = walk(lib, compiled, vocab, eos, seed, args.max_steps)
                    fills += f
                    accepts += a
                fills.sort()
                accepts.sort()
                row = {
                    "vocab": vocab, "library": lib.name, "grammar": gname, "compile_ms": round(compile_ms, 2), "steps": len(fills),
                    "fill_us_median": round(statistics.median(fills) * 1e6, 1), "fill_us_p99": round(fills[int(0.99 * (len(fills) - 1))] * 1e6, 1),
                    "accept_us_median": round(statistics.median(accepts) * 1e6, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        import llguidance
        import xgrammar

        meta = {"command": "python bench/grammar_mask_cpu.py " + " ".join(f"--vocab {' '.join(map(str, args.vocab))}".split()),
                "machine": platform.processor() or platform.machine(), "cpu_threads": 1, "torch": torch.__version__,
                "xgrammar": xgrammar.__version__ if hasattr(xgrammar, "__version__") else "0.2.9", "llguidance": llguidance.get_version() if hasattr(llguidance, "get_version") else "?"}
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
