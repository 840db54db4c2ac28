"""FP8 on one GPU: decode steps of bf16, fp8 KV, fp8 weights and both, each against its own floor.

For one preset (random weights of the real shape, written to --checkpoint-dir on the GPU
machine), and for each variant:

  decode      a decode-only step of B requests with C tokens each, replayed as a CUDA graph,
              logits and a greedy argmax read back (``graph_ms``: as the synchronous engine runs
              it; ``graph_gpu_ms``: graph replays back to back, the GPU's time alone)
  floor       (weight bytes read + KV bytes read) / the device copy bandwidth measured first;
              the variant's own bytes: fp8 weights are 1 byte per value plus their per-channel
              scales (the embedding table is left out, the bf16 LM head is in), an fp8 KV
              cache 1 byte per value
  blocks      KV blocks of --block-size tokens per GiB
  prefill     one --prefill-tokens prompt, timed eagerly, against the bf16 and the fp8 matmul
              rates measured in the same run (8192^3, torch.matmul and torch._scaled_mm with
              row-wise scales)
  gemm        the preset's linear shapes at M = the decode batch sizes: bf16 F.linear, the
              fp8 path (per-token activation quantization + torch._scaled_mm) and _scaled_mm
              alone, against the weight-read floor: where a small-batch kernel of our own
              would have to win

    python bench/gpu_fp8.py --preset llama-3.1-8b --batch-sizes 1 64 256 --context 1024 \\
        --long-context 32768 --out bench/results/fp8_h200/fp8.json

Nothing here is a test: numbers are recorded, not checked.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import checkpoint, copy_bandwidth, decode_batch, event_ms, matmul_rate, measure_prefill, step_fn

from splitserve.bench.timing import median_ms
from splitserve.config import CacheConfig, ModelConfig
from splitserve.engine.model_runner import ModelRunner
from splitserve.models.fp8 import FP8_DTYPE, fp8_linear, quantize_rows

# name -> (kv_cache_dtype, quantization)
VARIANTS = {"bf16": ("auto", "none"), "fp8_kv": ("fp8", "none"), "fp8_weights": ("auto", "fp8"), "fp8_both": ("fp8", "fp8")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-3.1-8b")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--long-context", type=int, default=32768, help="also batch 1 at this context (0: skip)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--prefill-tokens", type=int, default=4096, help="0: skip")
    p.add_argument("--gemm", action=argparse.BooleanOptionalAction, default=True, help="time the linear shapes alone")
    p.add_argument("--checkpoint-dir", type=Path, default=Path("/dev/shm/splitserve-bench"))
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def fp8_matmul_rate(n: int = 8192) -> float:
    """torch._scaled_mm on n^3 with row-wise scales and a bf16 output, FLOP/s."""
    a = torch.randn(n, n, device="cuda").to(FP8_DTYPE)
    b = torch.randn(n, n, device="cuda").to(FP8_DTYPE)  # [N, K] row-major: b.t() is the column-major operand
    sa, sb = torch.ones(n, 1, device="cuda"), torch.ones(1, n, device="cuda")
    ms = event_ms(lambda: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16), 10)
    return 2 * n**3 / (ms * 1e-3)


def fill_kv(kv: torch.Tensor) -> None:
    """Real-looking values (never zeros) in any KV dtype, a slice at a time (no full-size temporary)."""
    for start in range(0, kv.shape[0], 256):
        part = kv[start : start + 256]
        part.copy_(torch.randn(part.shape, device=part.device, dtype=torch.bfloat16))


def weight_bytes(runner: ModelRunner) -> int:
    model = runner.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(m.weight_scale.numel() * 4 for m in model.modules() if getattr(m, "weight_scale", None) is not None)
    return total - model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()


def measure_variant(name: str, model_dir: Path, args, bandwidth: float, rates: dict, rng: random.Random) -> dict:
    kv_dtype, quantization = VARIANTS[name]
    contexts = [(b, args.context) for b in args.batch_sizes] + ([(1, args.long_context)] if args.long_context else [])
    max_len = max(c for _, c in contexts + [(1, args.prefill_tokens)]) + args.block_size
    num_blocks = max(max(b * -(-c // args.block_size) for b, c in contexts), -(-args.prefill_tokens // args.block_size)) + 8
    start = time.perf_counter()
    runner = ModelRunner(
        ModelConfig(model_dir, dtype=torch.bfloat16, device="cuda", max_model_len=max_len, quantization=quantization),
        CacheConfig(block_size=args.block_size, num_blocks=num_blocks, enable_prefix_caching=False, kv_cache_dtype=kv_dtype),
    )
    load_s = time.perf_counter() - start
    fill_kv(runner.kv_cache)
    arch = runner.arch
    wbytes = weight_bytes(runner)
    kv_bytes_per_token = arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * runner.kv_cache.element_size()
    result = {
        "variant": name, "kv_cache_dtype": str(runner.kv_cache.dtype), "quantization": runner.quantization,
        "load_s": round(load_s, 1), "weight_bytes": wbytes, "kv_bytes_per_token": kv_bytes_per_token,
        "block_bytes": runner.block_bytes, "kv_blocks_per_gib": (1 << 30) // runner.block_bytes,
        "kv_scales": None if runner.kv_scales is None else runner.kv_scales.tolist(), "decode": [],
    }
    print(f"# {name}: {wbytes / 1e9:.2f} GB of weights per step, {kv_bytes_per_token} KV bytes per token, "
          f"{result['kv_blocks_per_gib']} blocks/GiB; loaded in {load_s:.1f}s", flush=True)
    for batch, context in contexts:
        out = decode_batch(runner, batch, context, rng)
        runner.graphs.capture((batch,))
        floor_ms = (wbytes + batch * context * kv_bytes_per_token) / bandwidth * 1e3
        row = {"batch": batch, "context": context, "floor_ms": floor_ms}
        row["graph_ms"] = median_ms(step_fn(runner, out), args.iters)
        row["graph_gpu_ms"] = event_ms(lambda b=batch: runner.graphs.replay(b), args.iters)
        row["ratio_to_floor"] = row["graph_ms"] / floor_ms
        row["gpu_ratio_to_floor"] = row["graph_gpu_ms"] / floor_ms
        row["tokens_per_s"] = batch / row["graph_ms"] * 1e3
        result["decode"].append(row)
        print("  " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if args.prefill_tokens:
        row = measure_prefill(runner, args.prefill_tokens, rates["fp8_matmul_flops"])
        row["fraction_of_bf16_matmul_rate"] = row["tflops"] * 1e12 / rates["bf16_matmul_flops"]
        result["prefill"] = row
    return result


def measure_gemm(model_dir: Path, batch_sizes, bandwidth: float) -> list[dict]:
    """The preset's distinct linear shapes alone, per M: bf16 vs the fp8 path vs _scaled_mm alone."""
    from splitserve.models.arch import load_arch_config

    cfg = load_arch_config(model_dir)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"qkv": (q + 2 * kv, cfg.hidden_size), "o": (cfg.hidden_size, q),
              "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size), "down": (cfg.hidden_size, cfg.intermediate_size)}
    rows = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        w_q, w_scale = quantize_rows(w)
        w_scale = w_scale.view(-1)
        for m in batch_sizes:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            x_q, x_scale = quantize_rows(x)

            def scaled_mm(x_q=x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale):
                return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=torch.bfloat16)

            row = {"layer": name, "n": n, "k": k, "m": m,
                   "bf16_us": event_ms(lambda x=x, w=w: F.linear(x, w), 50) * 1e3,
                   "fp8_us": event_ms(lambda x=x, w_q=w_q, w_scale=w_scale: fp8_linear(x, w_q, w_scale, use_kernel=True), 50) * 1e3,
                   "scaled_mm_us": event_ms(scaled_mm, 50) * 1e3,
                   "bf16_floor_us": 2 * n * k / bandwidth * 1e6, "fp8_floor_us": n * k / bandwidth * 1e6}
            rows.append(row)
            print("  gemm " + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def markdown(results: dict) -> str:
    lines = ["| variant | batch | context | step ms | GPU ms | floor ms | step / floor | tok/s |", "|---|---|---|---|---|---|---|---|"]
    for v in results["variants"]:
        for r in v["decode"]:
            lines.append(f"| {v['variant']} | {r['batch']} | {r['context']} | {r['graph_ms']:.2f} | {r['graph_gpu_ms']:.2f} | "
                         f"{r['floor_ms']:.2f} | {r['ratio_to_floor']:.2f} | {r['tokens_per_s']:.0f} |")
    lines += ["", "| variant | KV blocks / GiB | weight GB | 4k prefill ms | of fp8 matmul rate | of bf16 matmul rate |", "|---|---|---|---|---|---|"]
    for v in results["variants"]:
        p = v.get("prefill") or {}
        lines.append(f"| {v['variant']} | {v['kv_blocks_per_gib']} | {v['weight_bytes'] / 1e9:.2f} | {p.get('ms', float('nan')):.1f} | "
                     f"{p.get('fraction_of_matmul_rate', float('nan')):.2f} | {p.get('fraction_of_bf16_matmul_rate', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    rng = random.Random(0)
    bandwidth = copy_bandwidth()
    rates = {"bf16_matmul_flops": matmul_rate(), "fp8_matmul_flops": fp8_matmul_rate()}
    print(f"# copy {bandwidth / 1e12:.2f} TB/s; matmul bf16 {rates['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s, "
          f"fp8 {rates['fp8_matmul_flops'] / 1e12:.0f} TFLOP/s", flush=True)
    model_dir, init_s = checkpoint(args.preset, args.checkpoint_dir)
    results = {
        "command": " ".join(sys.argv), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "python": platform.python_version(), "preset": args.preset, "checkpoint_init_s": round(init_s, 1),
        "copy_bandwidth_bytes_per_s": bandwidth, **rates, "variants": [],
    }
    if args.gemm:
        results["gemm"] = measure_gemm(model_dir, args.batch_sizes, bandwidth)
    for name in args.variants:
        results["variants"].append(measure_variant(name, model_dir, args, bandwidth, rates, rng))
        gc.collect()
        torch.cuda.empty_cache()
        if args.out:  # after each variant: a run cut short keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    if args.out:
        args.out.with_suffix(".md").write_text(markdown(results) + "\n")


if __name__ == "__main__":
    main()
