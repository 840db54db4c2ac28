"""``splitserve bench serve``: load the router with a workload, sweep request rates and
concurrencies, print vLLM-style tables, and write JSON and PNG plots.

Exit status: 0 when every sweep point completed at least one request; 1 when the
target could not be reached, a warm-up failed, or a point had no successful request
(its results are still written); 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import shlex
import sys
import time
import uuid
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from splitserve.bench.client import GenerationClient, ModelInfo
from splitserve.bench.config import BenchConfig, ClientConfig, DatasetConfig, make_points, parse_percentiles
from splitserve.bench.datasets import BenchRequest, inject_invalid, jsonl_requests, random_requests
from splitserve.bench.loadgen import RequestFn
from splitserve.bench.metrics import parse_goodput
from splitserve.bench.openai_client import BACKENDS, OpenAIClient
from splitserve.bench.records import RequestRecord
from splitserve.bench.report import format_point, format_summary, results_document, write_json
from splitserve.bench.spec_metrics import SpecCounts, format_spec
from splitserve.bench.spec_metrics import scrape as scrape_spec
from splitserve.bench.sweep import PointResult, run_point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="splitserve bench serve",
        description="Benchmark a running server over splitserve's gRPC API or the OpenAI HTTP API "
        "(metrics defined as `vllm bench serve` defines them).",
    )
    p.add_argument("--target", required=True, help="the server, HOST:PORT (the gRPC port for --backend grpc, the HTTP port "
                   "otherwise); several of one platform: comma-separated, requests go to them in turn")
    p.add_argument("--backend", choices=BACKENDS, default="grpc",
                   help="grpc: splitserve's Generate; openai-completions / openai-chat: /v1/completions or "
                   "/v1/chat/completions streamed, as vLLM's benchmark sends them (any OpenAI-compatible server)")
    p.add_argument("--tokenizer", type=Path, help="a local tokenizer directory, for HTTP servers that do not report "
                   "their vocabulary (vLLM, SGLang) and for openai-chat's prompt text")
    p.add_argument("--api-key", default=None, help="HTTP backends: sent as a bearer token")
    d = p.add_argument_group("workload")
    d.add_argument("--dataset", choices=("random", "jsonl"), default="random")
    d.add_argument("--dataset-path", type=Path, help='JSONL file of {"prompt": ..., "output_len": ...}')
    d.add_argument("--num-prompts", type=int, help="requests per sweep point (random: default 100; jsonl: default every line)")
    d.add_argument("--input-len", type=int, default=1024, help="random prompt tokens after the shared prefix")
    d.add_argument("--output-len", type=int, default=128, help="output tokens (jsonl: where a line gives none)")
    d.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in [len*(1-r), len*(1+r)], 0 <= r < 1")
    d.add_argument("--prefix-len", type=int, default=0, help="tokens of shared prefix in front of every random prompt")
    d.add_argument("--num-prefixes", type=int, default=1, help="distinct shared prefixes, assigned round-robin")
    d.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly the requested output length (default: on)")
    d.add_argument("--temperature", type=float, default=None, help="sample at this temperature (default: greedy)")
    d.add_argument("--top-p", type=float, default=None, help="with --temperature: nucleus sampling")
    d.add_argument("--top-k", type=int, default=None, help="with --temperature: top-k sampling")
    d.add_argument("--inject-invalid", type=float, default=0.0, metavar="FRACTION",
                   help="send this fraction of requests with max_tokens over the server's limit (tests failure reporting)")
    d.add_argument("--seed", type=int, default=0, help="seeds prompts, arrivals and injected failures")
    lo = p.add_argument_group("load (comma-separated lists sweep; every rate x concurrency pair runs)")
    lo.add_argument("--request-rate", default="inf", help="requests/s, e.g. 1,2,4,inf (default inf: all at once)")
    lo.add_argument("--concurrency", "--max-concurrency", dest="concurrency", help="max in-flight requests, e.g. 1,8,64 (default unbounded)")
    lo.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1 is Poisson")
    lo.add_argument("--num-warmups", type=int, default=0, help="unrecorded requests sent first; the run stops if one fails")
    lo.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request (a gRPC deadline)")
    lo.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for the server to answer")
    r = p.add_argument_group("results")
    r.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:25 e2el:3000")
    r.add_argument("--percentiles", "--metric-percentiles", dest="percentiles", default="90,99", help="e.g. 50,90,99")
    r.add_argument("--out", type=Path, help="directory for LABEL.json and LABEL_*.png (none: print only)")
    r.add_argument("--label", default="splitserve", help="names the result files")
    r.add_argument("--no-plots", action="store_true", help="write the JSON only")
    r.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    r.add_argument("--worker-metrics", default=None, metavar="URL[,URL]",
                   help="decode workers' Prometheus endpoints (http://HOST:PORT/metrics): each point then reports "
                   "speculative decoding's acceptance rate and mean accepted length per worker")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    num_prompts = args.num_prompts
    if num_prompts is None and args.dataset == "random":
        num_prompts = 100
    return BenchConfig(
        client=ClientConfig(
            args.target, args.request_timeout, args.ready_timeout, args.ignore_eos,
            tuple((k, v) for k, v in (("temperature", args.temperature), ("top_p", args.top_p), ("top_k", args.top_k)) if v is not None),
            backend=args.backend, tokenizer=args.tokenizer, api_key=args.api_key,
        ),
        dataset=DatasetConfig(
            kind=args.dataset,
            num_prompts=num_prompts,
            input_len=args.input_len,
            output_len=args.output_len,
            range_ratio=args.range_ratio,
            prefix_len=args.prefix_len,
            num_prefixes=args.num_prefixes,
            path=args.dataset_path,
            inject_invalid=args.inject_invalid,
        ),
        points=make_points(args.request_rate, args.concurrency),
        burstiness=args.burstiness,
        seed=args.seed,
        percentiles=parse_percentiles(args.percentiles),
        slos_ms=parse_goodput(args.goodput),
        num_warmups=args.num_warmups,
        out_dir=args.out,
        plots=not args.no_plots,
        label=args.label,
        progress=not args.disable_tqdm,
    )


def build_requests(cfg: DatasetConfig, info: ModelInfo, seeds: np.random.SeedSequence) -> list[BenchRequest]:
    """The workload, checked against what the server says it can take. Zero in a
    ModelInfo field means the server did not say, and that check is skipped."""
    data_seed, inject_seed = seeds.spawn(2)
    if cfg.kind == "random":
        if info.vocab_size == 0:
            raise ValueError("the server reports vocab_size 0: cannot draw random token ids")
        spec = cfg.random_spec()
        # Fail before sending anything rather than measure a run of rejected requests.
        if info.max_model_len and spec.max_prompt_len() + spec.max_output_len() > info.max_model_len:
            raise ValueError(
                f"prompts up to {spec.max_prompt_len()} + outputs up to {spec.max_output_len()} tokens "
                f"exceed the model's max_model_len {info.max_model_len}"
            )
        requests = random_requests(spec, info.vocab_size, np.random.default_rng(data_seed), info.eos_token_ids)
    else:
        requests = jsonl_requests(
            cfg.path, cfg.num_prompts, cfg.output_len, np.random.default_rng(data_seed), info.vocab_size or 2**32
        )
    limit = info.effective_max_tokens()
    too_long = sum(r.output_len > limit for r in requests) if limit else 0
    if too_long:
        raise ValueError(f"{too_long} prompts ask for more than the server's limit of {limit} output tokens")
    if cfg.inject_invalid:
        if not limit:
            raise ValueError("--inject-invalid needs the server to report max_tokens_limit or max_model_len")
        requests = inject_invalid(requests, cfg.inject_invalid, limit + 1, np.random.default_rng(inject_seed))
    return requests


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


async def _warm_up(client: GenerationClient, request: BenchRequest, count: int, run_id: str) -> str | None:
    """None when every warm-up request succeeded, else the first failure's description."""
    for i in range(count):
        record = await client.generate(request, f"{run_id}-warmup-{i}")
        if not record.success:
            return f"{record.error_code}: {record.error_message}"
    return None


def _request_fn(client: GenerationClient, id_prefix: str) -> RequestFn:
    def send(request: BenchRequest) -> Awaitable[RequestRecord]:
        return client.generate(request, f"{id_prefix}-{request.index}")

    return send


def _client(cfg: ClientConfig) -> GenerationClient | OpenAIClient:
    if cfg.backend == "grpc":
        return GenerationClient(cfg.targets, cfg.request_timeout_s, cfg.ignore_eos, cfg.sampling)
    tokenizer = None
    if cfg.tokenizer is not None:
        from transformers import AutoTokenizer  # seconds to import: only for the HTTP backends that need it

        tokenizer = AutoTokenizer.from_pretrained(str(cfg.tokenizer), local_files_only=True)
    return OpenAIClient(cfg.backend, cfg.targets, cfg.request_timeout_s, cfg.ignore_eos, cfg.sampling, tokenizer, cfg.api_key)


SPEC_SETTLE_SECONDS = 1.5  # workers move their Prometheus counters every 0.5 s: the point's last steps land within this


async def _scrape_spec(urls: Sequence[str]) -> dict[str, SpecCounts]:
    return {url: await asyncio.to_thread(scrape_spec, url) for url in urls}


async def run(cfg: BenchConfig, argv: Sequence[str], worker_metrics: Sequence[str] = ()) -> int:
    run_id = f"bench-{uuid.uuid4().hex[:8]}"  # request ids only; never affects the workload
    started_at = time.time()
    seeds = np.random.SeedSequence(cfg.seed)
    data_seeds, arrival_seed = seeds.spawn(2)
    async with _client(cfg.client) as client:
        try:
            info = await client.model_info(cfg.client.ready_timeout_s)
        except grpc.aio.AioRpcError as e:
            print(f"error: {cfg.client.target} did not answer GetModelInfo: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except ConnectionError as e:
            print(f"error: {cfg.client.target} did not answer: {e}", file=sys.stderr)
            return 1
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            requests = build_requests(cfg.dataset, info, data_seeds)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"model {info.model} ({info.architecture}), vocab {info.vocab_size}, "
              f"max_model_len {info.max_model_len}; {len(requests)} requests per point, {len(cfg.points)} points")
        if cfg.num_warmups:
            valid = next((r for r in requests if not r.injected_invalid), requests[0])
            failure = await _warm_up(client, valid, cfg.num_warmups, run_id)
            if failure:
                print(f"error: a warm-up request failed ({failure}); not benchmarking", file=sys.stderr)
                return 1

        results: list[PointResult] = []
        spec: dict[str, dict[str, SpecCounts]] = {}
        for i, point in enumerate(cfg.points):
            send = _request_fn(client, f"{run_id}-p{i}")
            before = await _scrape_spec(worker_metrics)
            result = await run_point(point, requests, send, cfg.burstiness, arrival_seed,
                                     cfg.percentiles, cfg.slos_ms, cfg.progress)
            print(format_point(point, cfg.burstiness, result.metrics))
            if worker_metrics:
                await asyncio.sleep(SPEC_SETTLE_SECONDS)
                after = await _scrape_spec(worker_metrics)
                spec[point.label()] = {url: after[url] - before[url] for url in worker_metrics}
                print(format_spec(spec[point.label()]))
            results.append(result)

    if len(results) > 1:
        print(format_summary(results, cfg.tail_percentile))
    if cfg.out_dir is not None:
        _write_outputs(cfg, info, results, argv, started_at, spec)
    empty = [r.point.label() for r in results if r.metrics.completed == 0]
    if empty:
        print(f"error: no request succeeded at {', '.join(empty)}", file=sys.stderr)
        return 1
    return 0


def _write_outputs(
    cfg: BenchConfig, info: ModelInfo, results: list[PointResult], argv: Sequence[str], started_at: float,
    spec: dict[str, dict[str, SpecCounts]] | None = None,
) -> None:
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "command": "splitserve bench serve " + shlex.join(argv),
        "started_at_unix": started_at,
        **_jsonable(cfg),
    }
    document = results_document(config, _jsonable(info), results)
    if spec:  # per point label, per worker endpoint
        document["speculative_decoding"] = {label: {url: c.as_dict() for url, c in per.items()} for label, per in spec.items()}
    write_json(out / f"{cfg.label}.json", document)
    print(f"wrote {out / cfg.label}.json")
    if not cfg.plots:
        return
    from splitserve.bench import plots  # matplotlib takes a second to import; only here

    title = f"{cfg.label}: {info.model}"
    plots.plot_latency_cdfs(results, out / f"{cfg.label}_latency_cdf.png", title)
    plots.plot_throughput(results, out / f"{cfg.label}_throughput.png", title)
    plots.plot_tail_latency(results, out / f"{cfg.label}_tail_latency.png", cfg.tail_percentile, title)
    print(f"wrote {out / cfg.label}_{{latency_cdf,throughput,tail_latency}}.png")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return int(e.code or 0)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.print_usage(sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 2
    worker_metrics = [u for u in (args.worker_metrics or "").split(",") if u]
    return asyncio.run(run(cfg, argv, worker_metrics))


if __name__ == "__main__":
    raise SystemExit(main())
