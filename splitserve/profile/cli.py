"""``splitserve profile``: measure step and transfer times, write the profile JSON."""
from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="splitserve profile",
        description="Time prefill chunks, decode steps and KV transfers on this device; write one "
        "profile JSON (schema: splitserve/profile/schema.py) for the router and `splitserve sim`.",
    )
    p.add_argument("--model", type=Path, required=True, help="local checkpoint directory")
    p.add_argument("--name", default=None, help="the model shape's name in the profile (default: the directory's name)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the checkpoint's)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prefill-tokens", type=_ints, default=(16, 64, 256, 1024), help="chunk sizes, e.g. 256,1024,4096")
    p.add_argument("--prefill-contexts", type=_ints, default=(0,), help="cached tokens before each chunk, e.g. 0,2048")
    p.add_argument("--decode-batches", type=_ints, default=(1, 4, 16))
    p.add_argument("--decode-contexts", type=_ints, default=(128, 512))
    p.add_argument("--transfer-blocks", type=_ints, default=(1, 16, 64), help="blocks per KV READ")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="the profile JSON to write")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    from splitserve.profile.measure import ProfileGrid, run_profile  # torch: only when measuring

    try:
        grid = ProfileGrid(args.prefill_tokens, args.prefill_contexts, args.decode_batches, args.decode_contexts,
                           args.transfer_blocks, args.iters, args.warmup)
    except ValueError as e:
        parser.print_usage(sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 2
    profile = run_profile(args.model, args.device, args.dtype, grid, args.name or args.model.name, args.block_size)
    profile = replace(profile, notes="splitserve profile " + shlex.join(argv))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(args.out)
    m = profile.step_model
    print(f"step model: weights {m.weight_ms:.3f} ms + {m.kv_ms_per_token * 1e3:.4f} us/KV token + "
          f"{m.seq_ms:.4f} ms/seq | compute {m.compute_base_ms:.3f} ms + {m.token_ms * 1e3:.3f} us/token + "
          f"{m.pair_ms * 1e6:.4f} ns/pair")
    t = profile.transfer_model
    print(f"transfer model: {t.latency_ms:.3f} ms + bytes at {t.gb_per_s:.2f} GB/s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
