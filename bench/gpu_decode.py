"""Decode step time of the GPU fast path against the memory floor measured in the same run.

For each preset (random weights of the real shape, bf16, written to --checkpoint-dir on
the GPU machine itself) and each batch size, a decode-only step of B requests with
--context tokens each runs through ``ModelRunner.execute`` and a greedy argmax read back
to the host, as the engine runs it. Reported per step (median of --iters):

  graph       one step waited for: host-side inputs, CUDA graph replay, logits, argmax, sync
              (as the synchronous engine runs it)
  graph_gpu   graph replays back to back, timed with CUDA events: the GPU's time alone
              (what the engine's step takes with async scheduling, which hides the host's work)
  unfused     as ``graph`` but RMSNorm, residual adds and rotary as plain PyTorch ops
  eager       as ``graph`` with the graphs off (Triton kernels launched from Python)
  engine      ``LLMEngine.step()`` in steady decode: scheduler, inputs, graph, sampler; async
              scheduling and synchronous (engine_sync)

The floor of a step is (weight bytes read + KV bytes read) / the device-to-device copy
bandwidth measured first (bytes read + written per second); weight bytes exclude the
input embedding table, of which a step reads B rows. Prefill of --prefill-tokens tokens
in one request is timed eagerly and compared with the bf16 matmul rate measured here.

    python bench/gpu_decode.py --presets llama-3.2-1b llama-3.1-8b --batch-sizes 1 64 128 \\
        --context 1024 --long-context 32768 --out bench/results/gpu_decode_h100.json
    python bench/gpu_decode.py --plot bench/results/gpu_decode_h100.json docs/gpu_decode_h100.png
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from splitserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from splitserve.bench.timing import median_ms
from splitserve.engine.cuda_graphs import DecodeCUDAGraphs
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.scheduler import ScheduledRequest, SchedulerOutput

BLOCK_SIZE = 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 128])
    p.add_argument("--context", type=int, default=1024, help="tokens in each request's context")
    p.add_argument("--long-context", type=int, default=32768, help="also batch 1 at this context (0: skip)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--prefill-tokens", type=int, default=4096, help="0: skip the prefill measurement")
    p.add_argument("--ablation-batch-sizes", type=int, nargs="*", default=[1, 64], help="batches timed unfused and eager too")
    p.add_argument("--engine-batch", type=int, default=64, help="batch of the LLMEngine decode measurement (0: skip)")
    p.add_argument("--hf-batch", type=int, default=0, help="also time transformers generate at this batch, first preset only")
    p.add_argument("--checkpoint-dir", type=Path, default=Path("/dev/shm/splitserve-bench"))
    p.add_argument("--out", type=Path)
    p.add_argument("--plot", nargs=2, type=Path, metavar=("JSON", "PNG"), help="only draw the plot of a results file")
    return p.parse_args(argv)





def event_ms(fn, iters: int) -> float:
    """Mean GPU time of ``fn`` over ``iters`` back-to-back calls (median of 5 such runs)."""
    fn()
    runs = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) / iters)
    return statistics.median(runs)


def graph_ms(fn, calls: int = 20) -> float:
    """GPU time of one call of ``fn``, from a CUDA graph of ``calls`` calls: no launch overhead in it."""
    fn()  # compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return event_ms(graph.replay, 10) / calls


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second, 1 GiB buffers."""
    x = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = event_ms(lambda: y.copy_(x), 20)
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = event_ms(lambda: a @ b, 10)
    return 2 * 8192**3 / (ms * 1e-3)


def checkpoint(preset: str, root: Path) -> tuple[Path, float]:
    from splitserve.models.checkpoint_init import init_checkpoint

    path = root / preset
    if (path / "config.json").exists():
        return path, 0.0
    start = time.perf_counter()
    init_checkpoint(path, "llama", preset, device="cuda")
    return path, time.perf_counter() - start


def decode_batch(runner: ModelRunner, batch: int, context: int, rng: random.Random) -> SchedulerOutput:
    """B requests with ``context`` tokens each, the last one being computed now, in random blocks."""
    per = -(-context // runner.block_size)
    blocks = rng.sample(range(runner.num_blocks), batch * per)
    return SchedulerOutput(
        [
            ScheduledRequest(f"b{i}", [rng.randrange(3, 1000)], context - 1, blocks[i * per : (i + 1) * per], True)
            for i in range(batch)
        ]
    )


def step_fn(runner: ModelRunner, out: SchedulerOutput):
    return lambda: runner.execute(out).argmax(-1).tolist()


def measure_preset(preset: str, args, bandwidth: float, mm_rate: float, rng: random.Random) -> dict:
    model_dir, init_s = checkpoint(preset, args.checkpoint_dir)
    contexts = [(b, args.context) for b in args.batch_sizes] + ([(1, args.long_context)] if args.long_context else [])
    max_len = max(c for _, c in contexts + [(1, args.prefill_tokens)]) + BLOCK_SIZE
    num_blocks = max(max(b * -(-c // BLOCK_SIZE) for b, c in contexts), -(-args.prefill_tokens // BLOCK_SIZE)) + 8
    start = time.perf_counter()
    runner = ModelRunner(
        ModelConfig(model_dir, dtype=torch.bfloat16, device="cuda", max_model_len=max_len),
        CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks, enable_prefix_caching=False),
    )
    load_s = time.perf_counter() - start
    runner.kv_cache.normal_()  # attention reads real-looking numbers, never zeros
    model, arch = runner.model, runner.arch
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes = param_bytes - model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    kv_bytes_per_token = arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * runner.dtype.itemsize
    result = {
        "preset": preset,
        "checkpoint_init_s": round(init_s, 1),
        "load_s": round(load_s, 1),
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_bytes_per_token,
        "decode": [],
    }
    print(f"# {preset}: {weight_bytes / 1e9:.2f} GB of weights read per step; loaded in {load_s:.1f}s", flush=True)
    for batch, context in contexts:
        out = decode_batch(runner, batch, context, rng)
        runner.graphs.capture((batch,))
        floor_ms = (weight_bytes + batch * context * kv_bytes_per_token) / bandwidth * 1e3
        row = {"batch": batch, "context": context, "floor_ms": floor_ms}
        row["graph_ms"] = median_ms(step_fn(runner, out), args.iters)
        row["graph_gpu_ms"] = event_ms(lambda: runner.graphs.replay(batch), args.iters)
        if batch in args.ablation_batch_sizes and context == args.context:
            graphs = runner.graphs
            runner.graphs = None
            row["eager_ms"] = median_ms(step_fn(runner, out), max(5, args.iters // 5))
            model.use_gpu_kernels(False)
            row["eager_unfused_ms"] = median_ms(step_fn(runner, out), max(5, args.iters // 5))
            runner.graphs = DecodeCUDAGraphs(
                model, runner.kv_cache, runner.backend, runner.block_size, runner.max_model_len, max_batch=batch
            )
            row["unfused_ms"] = median_ms(step_fn(runner, out), args.iters)
            row["unfused_gpu_ms"] = event_ms(lambda: runner.graphs.replay(batch), args.iters)
            model.use_gpu_kernels(True)
            runner.graphs = graphs
        row["ratio_to_floor"] = row["graph_ms"] / floor_ms
        row["tokens_per_s"] = batch / row["graph_ms"] * 1e3
        result["decode"].append(row)
        print("  " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    result["attention"] = measure_attention(runner, args.batch_sizes, args.context, bandwidth, rng)
    if args.prefill_tokens:
        result["prefill"] = measure_prefill(runner, args.prefill_tokens, mm_rate, rng)
    if args.engine_batch:
        floor_ms = (weight_bytes + args.engine_batch * args.context * kv_bytes_per_token) / bandwidth * 1e3
        # "engine": async scheduling (the default on a GPU); "engine_sync": each step waits for the device.
        for key, overlap in (("engine_sync", False), ("engine", True)):
            result[key] = measure_engine(runner, model_dir, args.engine_batch, args.context, rng, async_scheduling=overlap)
            result[key]["floor_ms"] = floor_ms
    return result  # the runner, its cache and graphs go with this frame; main() then frees the memory


def measure_attention(runner: ModelRunner, batch_sizes, context: int, bandwidth: float, rng: random.Random) -> list[dict]:
    """One layer's decode attention alone (in a CUDA graph), per context split count: KV bytes read / time vs the copy bandwidth."""
    from splitserve.kernels.paged_decode import default_num_splits, paged_decode_attention

    arch, rows = runner.arch, []
    kv_layer = runner.kv_cache[:, :, 0]
    for batch in batch_sizes:
        out = decode_batch(runner, batch, context, rng)
        table = torch.zeros((batch, max(len(s.block_ids) for s in out.scheduled)), dtype=torch.int32)
        for i, s in enumerate(out.scheduled):
            table[i, : len(s.block_ids)] = torch.tensor(s.block_ids)
        table = table.cuda()
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        q = torch.randn((batch, arch.num_heads, arch.head_dim), device="cuda", dtype=runner.dtype)
        kv_bytes = batch * context * 2 * arch.num_kv_heads * arch.head_dim * runner.dtype.itemsize
        for splits in (1, 2, 4, 8, 16, 32):
            ms = graph_ms(lambda: paged_decode_attention(q, kv_layer, table, lens, 0.1, None, splits))
            rows.append({"batch": batch, "context": context, "num_splits": splits, "us": ms * 1e3,
                         "fraction_of_copy_bandwidth": kv_bytes / (ms * 1e-3) / bandwidth,
                         "default": splits == default_num_splits(batch, arch.num_kv_heads)})
        best = min((r for r in rows if r["batch"] == batch), key=lambda r: r["us"])
        chosen = next(r for r in rows if r["batch"] == batch and r["default"])
        print(f"  attention B={batch}: default {chosen['num_splits']} splits {chosen['us']:.0f} us "
              f"({chosen['fraction_of_copy_bandwidth']:.2f} of copy bw); best {best['num_splits']} splits {best['us']:.0f} us", flush=True)
    return rows


def measure_prefill(runner: ModelRunner, num_tokens: int, mm_rate: float, rng: random.Random) -> dict:
    arch = runner.arch
    blocks = list(range(-(-num_tokens // runner.block_size)))
    out = SchedulerOutput([ScheduledRequest("p", [rng.randrange(3, 1000) for _ in range(num_tokens)], 0, blocks, True)])
    ms = median_ms(lambda: runner.execute(out).argmax(-1).tolist(), 5, warmup=2)
    layer_params = sum(p.numel() for layer in runner.model.layers for p in layer.parameters() if p.dim() == 2)
    causal_pairs = num_tokens * (num_tokens + 1) / 2
    attn_flops = 4 * causal_pairs * arch.num_heads * arch.head_dim * arch.num_layers  # QK^T and PV
    flops = 2 * layer_params * num_tokens + attn_flops + 2 * arch.hidden_size * arch.vocab_size
    row = {"tokens": num_tokens, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "fraction_of_matmul_rate": flops / (ms * 1e-3) / mm_rate}
    print(f"  prefill {num_tokens} tokens: {ms:.1f} ms, {row['tflops']:.0f} TFLOP/s = {row['fraction_of_matmul_rate']:.2f} of the matmul rate", flush=True)
    return row


def measure_engine(
    runner: ModelRunner, model_dir: Path, batch: int, context: int, rng: random.Random, steps: int = 40, async_scheduling: bool = True
) -> dict:
    from splitserve.engine.engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams

    # Prompts of context - steps tokens all prefill in one step, so the batch decodes in lock-step
    # and ends at ``context`` tokens: it fits the runner's blocks (sized for batch x context), and
    # no request is preempted (a preempted batch is smaller and faster: not this measurement).
    config = EngineConfig(
        model=ModelConfig(model_dir, dtype=torch.bfloat16, device="cuda", max_model_len=runner.max_model_len),
        cache=CacheConfig(block_size=runner.block_size, num_blocks=runner.num_blocks, enable_prefix_caching=False),
        scheduler=SchedulerConfig(
            max_num_seqs=batch, max_num_batched_tokens=batch * context, max_tokens_limit=max(4096, steps),
            async_scheduling=async_scheduling,
        ),
    )
    engine = LLMEngine(config, runner=runner)
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"e{i}", [rng.randrange(3, 1000) for _ in range(context - steps)], params)
    times = []
    while engine.has_unfinished:
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    assert engine.scheduler.num_preemptions == 0, "the batch did not fit the runner's KV blocks"
    steps_timed = times[3:-3]  # from the prefill step and the steps around it to the end of the batch
    row = {"batch": batch, "context": context, "step_ms": statistics.median(steps_timed) * 1e3, "decode_steps": len(steps_timed)}
    row["tokens_per_s"] = batch / row["step_ms"] * 1e3
    row["async_scheduling"] = engine.async_scheduling
    mode = "async" if engine.async_scheduling else "sync"
    print(f"  engine decode ({mode}), batch {batch}: {row['step_ms']:.2f} ms/step, {row['tokens_per_s']:.0f} tok/s", flush=True)
    return row


def measure_hf(model_dir: Path, batch: int, context: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(3, 1000, (batch, context - 1), device="cuda")
    mask = torch.ones_like(ids)

    def generate(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.inference_mode():
        generate(2)
        one, many = generate(1), generate(17)
    step_ms = (many - one) / 16 * 1e3
    row = {"batch": batch, "context": context, "step_ms": step_ms, "tokens_per_s": batch / step_ms * 1e3}
    print(f"  transformers generate, batch {batch}: {step_ms:.1f} ms/step, {row['tokens_per_s']:.0f} tok/s", flush=True)
    return row


def markdown(results: dict) -> str:
    lines = [
        f"Device: {results['device']}; copy bandwidth {results['copy_bandwidth_gbps']:.0f} GB/s (read + write), "
        f"bf16 matmul {results['matmul_tflops']:.0f} TFLOP/s.",
        "",
        "| preset | batch | context | floor ms | graph ms | x floor | GPU-only ms | unfused ms | eager ms | tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in results["presets"]:
        for r in p["decode"]:
            lines.append(
                f"| {p['preset']} | {r['batch']} | {r['context']} | {r['floor_ms']:.2f} | {r['graph_ms']:.2f} | "
                f"{r['ratio_to_floor']:.2f} | {r['graph_gpu_ms']:.2f} | {r.get('unfused_ms', float('nan')):.2f} | "
                f"{r.get('eager_ms', float('nan')):.2f} | {r['tokens_per_s']:.0f} |"
            )
    lines.append("")
    for p in results["presets"]:
        if "prefill" in p:
            f = p["prefill"]
            lines.append(f"- {p['preset']} prefill of {f['tokens']} tokens: {f['ms']:.1f} ms, {f['tflops']:.0f} TFLOP/s, {f['fraction_of_matmul_rate']:.2f} of the matmul rate")
        for key, mode in (("engine_sync", "synchronous"), ("engine", "async scheduling")):
            if key in p:
                e = p[key]
                lines.append(f"- {p['preset']} LLMEngine decode ({mode}), batch {e['batch']}, context {e['context']}: {e['step_ms']:.2f} ms/step ({e['step_ms'] / e['floor_ms']:.2f}x floor), {e['tokens_per_s']:.0f} tok/s")
        if "hf" in p:
            h = p["hf"]
            lines.append(f"- {p['preset']} transformers generate, batch {h['batch']}: {h['step_ms']:.1f} ms/step, {h['tokens_per_s']:.0f} tok/s")
    return "\n".join(lines)


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels, graph, gpu, unfused = [], [], [], []
    has_unfused = any("unfused_ms" in r for p in results["presets"] for r in p["decode"])
    for p in results["presets"]:
        for r in p["decode"]:
            labels.append(f"{p['preset']}\nB={r['batch']} ctx={r['context']}")
            graph.append(r["graph_ms"] / r["floor_ms"])
            gpu.append(r["graph_gpu_ms"] / r["floor_ms"])
            unfused.append(r["unfused_ms"] / r["floor_ms"] if "unfused_ms" in r else 0)
    x = range(len(labels))
    w = 0.27
    if has_unfused:
        ax.bar([i - w for i in x], unfused, w, label="graph, unfused norm/rotary")
    ax.bar(list(x), graph, w, label="graph + fused, host waits each step (synchronous engine)")
    ax.bar([i + w for i in x], gpu, w, label="GPU time alone (the async engine's step)")
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("decode step time / floor")
    ax.set_title(f"Decode step vs weights+KV read floor ({results['device']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plot:
        plot(json.loads(args.plot[0].read_text()), args.plot[1])
        return
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    bandwidth, mm_rate = copy_bandwidth(), matmul_rate()
    results = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "host": platform.node(),
        "copy_bandwidth_gbps": bandwidth / 1e9,
        "matmul_tflops": mm_rate / 1e12,
        "presets": [],
    }
    print(f"# copy {bandwidth / 1e9:.0f} GB/s, bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s", flush=True)
    for i, preset in enumerate(args.presets):
        row = measure_preset(preset, args, bandwidth, mm_rate, rng)
        gc.collect()
        torch.cuda.empty_cache()
        if args.hf_batch and i == 0:
            row["hf"] = measure_hf(args.checkpoint_dir / preset, args.hf_batch, args.context)
            gc.collect()
            torch.cuda.empty_cache()
        results["presets"].append(row)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    if args.out:
        args.out.with_name(args.out.stem + "_table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
