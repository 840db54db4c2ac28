"""The `splitserve` command: model init, up, router, prefill, decode, generate, bench."""
from __future__ import annotations

import argparse
import asyncio
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from splitserve.cli_errors import (
    OneLineParser, UsageError, fraction, non_negative_float, non_negative_int, port_number, port_or_off, positive_float, positive_int, user_error_message,
)

DEMO_DIR = Path.home() / ".cache" / "splitserve" / "demo-llama-tiny"


def _add_listen(p: argparse.ArgumentParser, port: int, metrics_port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)")
    p.add_argument("--port", type=port_number, default=port, help="gRPC port (0: any free port)")
    p.add_argument("--metrics-port", type=port_or_off, default=metrics_port, help="Prometheus /metrics port (0: any free port, -1: off)")
    p.add_argument("--drain-seconds", type=non_negative_float, default=30.0, help="grace period for in-flight requests on SIGTERM")


def _add_engine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="local Hugging Face checkpoint directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the checkpoint's)")
    p.add_argument("--block-size", type=positive_int, default=16)
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                   help="fp8: an e4m3 KV cache (half the bytes per block) with per-layer K/V scales from the checkpoint, else measured at start; "
                        "prefill and decode pools must agree")
    p.add_argument("--quantization", choices=("fp8", "none"), default=None,
                   help="fp8: linear weights quantized to e4m3 at load (per-channel scales, per-token activations); none: keep --dtype; "
                        "default: the checkpoint's (an FP8 checkpoint stays FP8)")
    p.add_argument("--kv-cache-mb", type=positive_int, default=None, help="KV cache budget (default: 256 on CPU; on CUDA --gpu-memory-utilization of what the weights leave)")
    p.add_argument("--gpu-memory-utilization", type=fraction, default=0.9)
    p.add_argument("--lazy-graphs", action="store_true",
                   help="on CUDA: capture each decode graph when a batch first needs it, not before serving (starts faster)")
    p.add_argument("--host-kv-cache-mb", type=positive_int, default=None,
                   help="host memory (pinned on CUDA) for prefix blocks evicted from the KV cache; they come back as hits (default: none)")
    p.add_argument("--num-blocks", type=positive_int, default=None, help="fixed number of KV blocks (overrides the budget)")
    p.add_argument("--max-num-seqs", type=positive_int, default=64)
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=2048)
    p.add_argument("--max-waiting", type=non_negative_int, default=1024,
                   help="requests that may wait beyond --max-num-seqs; past that new ones are refused (RESOURCE_EXHAUSTED)")
    p.add_argument("--max-model-len", type=positive_int, default=None)
    p.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto",
                   help="schedule step N+1 while the GPU runs step N; auto: on, on a GPU")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--speculative", choices=("off", "ngram", "draft"), default="off",
                   help="speculative decoding: ngram (prompt lookup) or draft (--draft-model); decode steps then run synchronously")
    p.add_argument("--num-speculative-tokens", type=positive_int, default=3, help="tokens proposed per request and step (K)")
    p.add_argument("--draft-model", type=Path, default=None, help="with --speculative draft: a checkpoint with the target's vocabulary")
    p.add_argument("--tp-size", type=positive_int, default=1,
                   help="tensor-parallel size: one process per rank, on --device and the next GPUs (gloo on CPU); the KV pool of any TP size can exchange KV with this one")


def _add_worker(p: argparse.ArgumentParser, port: int, metrics_port: int) -> None:
    from splitserve.controlplane.interface import DEFAULT_REGISTRATION_TTL_SECONDS

    _add_engine(p)
    _add_listen(p, port, metrics_port)
    p.add_argument("--worker-id", default=None, help="stable id of this worker (default: role-host-port)")
    p.add_argument("--advertise-address", default=None, help="host:port the router and peers reach this worker at")
    p.add_argument("--control-plane", required=True, help="redis://HOST:PORT/DB, or grpc://ROUTER:PORT for a router's embedded store")
    _add_control_plane_password(p)
    p.add_argument("--lease-seconds", type=positive_float, default=30.0)
    p.add_argument("--transfer-timeout", type=positive_float, default=10.0)
    p.add_argument("--min-kv-gbps", type=non_negative_float, default=0.0,
                   help="decode: refuse a prefill peer whose handshake read is slower than this many GB/s (its requests are prefilled here); 0: only log it")
    p.add_argument("--registration-ttl", type=positive_float, default=DEFAULT_REGISTRATION_TTL_SECONDS,
                   help="seconds the control plane keeps this worker without a heartbeat (heartbeats go every second); "
                        "routers keep the last known workers this long after the store comes back empty")
    p.add_argument("--kv-peer-backoff", type=positive_float, default=5.0,
                   help="decode: seconds a prefill peer is backed off after a failed transfer before one request probes it (doubles per failed probe, up to 60)")
    tls = p.add_argument_group("TLS (docs/security.md)")
    tls.add_argument("--tls-cert", type=Path, default=None, help="certificate (PEM) this worker serves with and presents to its peers")
    tls.add_argument("--tls-key", type=Path, default=None, help="its private key (PEM)")
    tls.add_argument("--tls-ca", type=Path, default=None,
                     help="CA bundle peers are checked against; callers must then present a certificate it signed (mutual TLS)")
    tls.add_argument("--tls-server-name", default=None, help="name expected in peers' certificates instead of the host of their address")
    p.add_argument("--worker-keys-file", type=Path, default=None,
                   help="the worker credential (never a client's API key): callers of this worker must present one of its keys; "
                        "it presents the first to the control plane and to its peers (docs/security.md)")


def _add_control_plane_password(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control-plane-password-env", metavar="VAR", default=None,
                   help="read the Redis password from environment variable VAR (a Secret's secretKeyRef in a pod), so it never appears in arguments")


def _control_plane_url(args) -> str:
    """--control-plane with the password of --control-plane-password-env put in (redis:// and rediss:// only)."""
    import os
    from urllib.parse import quote, urlsplit, urlunsplit

    url, var = args.control_plane, args.control_plane_password_env
    if var is None:
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise UsageError(f"--control-plane-password-env needs a redis:// or rediss:// --control-plane, not {url!r}")
    if not os.environ.get(var):
        raise UsageError(f"--control-plane-password-env: environment variable {var} is not set or empty")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(parts.username or '', safe='')}:{quote(os.environ[var], safe='')}@{host}"))


def _add_router_security(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-keys-file", type=Path, default=None,
                   help="accepted API keys, one per line (e.g. a mounted Secret; re-read when it changes); clients send authorization: Bearer KEY")
    p.add_argument("--worker-keys-file", type=Path, default=None,
                   help="accepted worker keys (the embedded control plane takes only these); the first is presented to the workers")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="let chat requests bring their own chat_template (it is rendered in the router: trusted clients only)")
    tls = p.add_argument_group("TLS (docs/security.md)")
    tls.add_argument("--tls-cert", type=Path, default=None, help="certificate (PEM) of the public gRPC and HTTP listeners")
    tls.add_argument("--tls-key", type=Path, default=None, help="its private key (PEM)")
    tls.add_argument("--tls-ca", type=Path, default=None, help="CA bundle the workers' certificates are checked against: turns on TLS to the workers")
    tls.add_argument("--tls-client-cert", type=Path, default=None, help="certificate presented to the workers (mutual TLS; default: --tls-cert)")
    tls.add_argument("--tls-client-key", type=Path, default=None, help="its private key (default: --tls-key)")
    tls.add_argument("--tls-server-name", default=None, help="name expected in the workers' certificates instead of the host of their address")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="splitserve", description="LLM serving with prefill and decode disaggregated")
    parser.add_argument("--version", action="version", version=f"splitserve {_version()}")
    logs = argparse.ArgumentParser(add_help=False)
    logs.add_argument("--log-level", default="WARNING")
    logs.add_argument("--log-format", default="text", choices=("text", "json"), help="json: one object per line, with the request id")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser

    def add_service(name: str, **kwargs) -> argparse.ArgumentParser:
        return add(name, parents=[logs], **kwargs)

    model = sub.add_parser("model", help="checkpoint tools").add_subparsers(dest="model_command", required=True)
    init = model.add_parser(
        "init",
        help="write a RANDOM-WEIGHT checkpoint of a real architecture (it produces meaningless text)",
        description="Writes a random-weight checkpoint of a real architecture plus a tokenizer built locally. "
        "Such a model produces meaningless text: it is for tests, demos and speed measurements. Nothing is downloaded.",
    )
    init.add_argument("out_dir", type=Path)
    init.add_argument("--arch", default="llama", choices=("llama", "qwen2", "qwen3", "mistral"))
    init.add_argument("--preset", default="tiny", help="tiny, or a real shape: llama-3.2-1b, llama-3.1-8b, qwen3-0.6b, qwen3-8b, ...")
    init.add_argument("--dtype", default=None)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--device", default="cpu", help="where to generate the random weights (cuda is faster for big presets)")
    init.add_argument("--overwrite", action="store_true")

    up = add_service("up", help="router + one prefill + one decode worker on this machine (--mode colocated: one worker that does both)")
    up.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: a random-weight demo model)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=port_number, default=50051)
    up.add_argument("--device", default="cpu", help="where the workers run (cuda: both on one GPU, their KV memory split)")
    up.add_argument("--mode", choices=("disaggregated", "colocated"), default="disaggregated",
                    help="colocated: one worker prefills and decodes (no KV hand-off)")
    up.add_argument("--prefill-device", default=None, help="the prefill worker's device (default --device), e.g. cuda:0")
    up.add_argument("--decode-device", default=None, help="the decode worker's device (default --device), e.g. cuda:1")
    up.add_argument("--prefill-memory-share", type=fraction, default=0.2,
                    help="with both workers on one GPU: the prefill worker's share of the KV memory (it holds prompts only until decode reads them)")
    up.add_argument("--gpu-memory-utilization", type=fraction, default=0.9, help="on a GPU: the share of free memory the workers' KV caches take together")
    up.add_argument("--max-num-seqs", type=positive_int, default=None, help="each worker's running batch limit (default: the workers')")
    up.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default=None, help="both workers' KV cache dtype (default: the workers')")
    up.add_argument("--quantization", choices=("fp8", "none"), default=None, help="both workers' weight quantization (default: the checkpoint's)")
    up.add_argument("--max-num-batched-tokens", type=positive_int, default=None, help="each worker's token budget per step (default: the workers')")
    up.add_argument("--prefill-threshold", type=non_negative_int, default=0, help="prompts shorter than this skip the prefill worker")
    up.add_argument("--http-port", type=port_or_off, default=8000, help="OpenAI-compatible HTTP API port (0: any free port, -1: off)")
    up.add_argument("--api-keys-file", type=Path, default=None, help="accepted API keys, one per line (both APIs then need one)")
    up.add_argument("--worker-keys-file", type=Path, default=None,
                    help="the workers' credential towards the router and each other (default: a fresh key for this run; never a client key)")
    up.add_argument("--tls-cert", type=Path, default=None, help="certificate (PEM) of the public listeners; needs --tls-ca")
    up.add_argument("--tls-key", type=Path, default=None)
    up.add_argument("--tls-ca", type=Path, default=None,
                    help="CA that signed --tls-cert: the three processes then also speak mutual TLS to each other with that certificate")

    router = add_service("router", help="the public gRPC front")
    router.add_argument("--model", type=Path, required=True, help="checkpoint directory (for the tokenizer and limits)")
    _add_listen(router, 50051, 9090)
    router.add_argument("--control-plane", default="embedded", help="redis://... to share state between routers; embedded: in-process")
    _add_control_plane_password(router)
    router.add_argument("--policy", default="prefix_aware", choices=("prefix_aware", "least_loaded", "round_robin"))
    router.add_argument("--prefill-threshold", type=non_negative_int, default=0, help="prompts shorter than this are prefilled on the decode worker")
    router.add_argument("--placement-profile", type=Path, default=None,
                        help="profile JSON of the workers (splitserve profile): prefill each prompt remotely or on its decode worker, "
                        "whichever the estimated TTFT and ITL leave more headroom to the SLOs")
    router.add_argument("--placement-slo", default="ttft:500,itl:50", help="with --placement-profile: the SLOs in ms")
    router.add_argument("--placement-budget", type=positive_int, default=8192, help="with --placement-profile: the workers' --max-num-batched-tokens")
    router.add_argument("--block-size", type=positive_int, default=16)
    router.add_argument("--max-tokens-limit", type=positive_int, default=4096)
    router.add_argument("--default-max-tokens", type=positive_int, default=256)
    router.add_argument("--max-model-len", type=positive_int, default=None)
    router.add_argument("--max-inflight", type=positive_int, default=1024, help="requests in flight before RESOURCE_EXHAUSTED")
    router.add_argument("--http-port", type=port_or_off, default=8000, help="OpenAI-compatible HTTP API port (0: any free port, -1: off)")
    router.add_argument("--served-model-name", default=None, help="model name the APIs report and accept (default: the checkpoint folder's name)")
    _add_router_security(router)

    _add_worker(add_service("prefill", help="a prefill worker"), 50061, 9091)
    decode = add_service("decode", help="a decode worker")
    _add_worker(decode, 50071, 9092)
    decode.add_argument("--accept-prefill", action="store_true",
                        help="mixed role: also prefill prompts for other decode workers (PrefillWorker on the same port); "
                        "routers with --placement-profile send it some only while its own batch leaves room")

    gen = sub.add_parser("generate", help="stream a completion from a running router")
    gen.add_argument("prompt")
    gen.add_argument("--target", default="127.0.0.1:50051")
    gen.add_argument("--max-tokens", type=positive_int, default=64)
    gen.add_argument("--temperature", type=non_negative_float, default=0.0)
    gen.add_argument("--ignore-eos", action="store_true")

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    bench.add_parser("serve", help="load generator against a live router", add_help=False)
    sub.add_parser("planner", help="scale the prefill and decode pools on Kubernetes", add_help=False)
    sub.add_parser("profile", help="time prefill, decode and KV transfer on this device", add_help=False)
    sub.add_parser("sim", help="simulate a serving layout from profiles", add_help=False)
    return parser


def _version() -> str:
    try:
        return version("splitserve")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Runs a command. A mistake the user can fix is one line on stderr and exit status 2;
    Ctrl-C ends quietly with 130, as shells expect."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130
    except (Exception, SystemExit) as e:
        message = user_error_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["planner"]:
        from splitserve.planner import run_planner

        return run_planner(argv[1:])
    if argv[:1] == ["profile"]:
        from splitserve.profile.cli import main as profile_main

        return profile_main(argv[1:])
    if argv[:1] == ["sim"]:
        from splitserve.sim.cli import main as sim_main

        return sim_main(argv[1:])
    if argv[:2] == ["bench", "serve"]:
        from splitserve.bench.serve import main as bench_main

        return bench_main(argv[2:])
    args = build_parser().parse_args(argv)
    from splitserve.logs import configure

    configure(getattr(args, "log_level", "WARNING"), getattr(args, "log_format", "text"), args.command)
    if args.command == "model":
        from splitserve.models.checkpoint_init import init_checkpoint

        try:
            path = init_checkpoint(args.out_dir, args.arch, args.preset, dtype=args.dtype, seed=args.seed, device=args.device, overwrite=args.overwrite)
        except FileExistsError:
            print(f"error: {args.out_dir} is not empty; --overwrite replaces its checkpoint", file=sys.stderr)
            return 2
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote a random-weight {args.arch} {args.preset} checkpoint to {path} (it produces meaningless text)")
        return 0
    if args.command == "up":
        from splitserve.up import run_up

        return run_up(args)
    if args.command == "generate":
        from splitserve.client import stream_to_terminal

        _check_router_answers(args.target)
        return stream_to_terminal(args)
    if args.command == "router":
        return _run_router(args)
    return _run_worker(args)


def _check_router_answers(target: str, timeout: float = 5.0) -> None:
    """A --target nobody listens at is the user's mistake: one line, not an RPC error mid-stream."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise UsageError(f"no router answers at {target} within {timeout:g}s (is `splitserve up` running? --target)") from None


def _security_errors_in_one_line(run):
    """Unreadable certificates, unpaired TLS flags, an empty keys file: a one-line error, exit code 2."""

    def wrapped(args) -> int:
        from splitserve.services.security import SecurityConfigError

        try:
            return run(args)
        except SecurityConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapped


@_security_errors_in_one_line
def _run_router(args) -> int:
    from splitserve.services.launch import Listen, RouterConfig, serve_router
    from splitserve.services.security import router_tls

    listen = Listen(args.host, args.port, None if args.metrics_port < 0 else args.metrics_port, args.drain_seconds)
    config = RouterConfig(
        model_dir=args.model,
        listen=listen,
        control_plane_url=_control_plane_url(args),
        policy=args.policy,
        prefill_threshold=args.prefill_threshold,
        placement_profile=args.placement_profile,
        placement_slo=args.placement_slo,
        placement_budget=args.placement_budget,
        block_size=args.block_size,
        default_max_tokens=args.default_max_tokens,
        max_tokens_limit=args.max_tokens_limit,
        max_model_len=args.max_model_len,
        max_inflight=args.max_inflight,
        http_port=None if args.http_port < 0 else args.http_port,
        served_model_name=args.served_model_name,
        tls=router_tls(args.tls_cert, args.tls_key, args.tls_ca, args.tls_client_cert, args.tls_client_key, args.tls_server_name),
        api_keys_file=args.api_keys_file,
        worker_keys_file=args.worker_keys_file,
        trust_request_chat_template=args.trust_request_chat_template,
    )
    return _serve(serve_router(config))


@_security_errors_in_one_line
def _run_worker(args) -> int:
    from splitserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, TransferConfig
    from splitserve.services.launch import Listen, serve_worker
    from splitserve.services.security import worker_tls
    from splitserve.services.worker import WorkerConfig

    from splitserve.config import ConfigError, ParallelConfig
    from splitserve.parallel import RankFailedError

    try:
        parallel = ParallelConfig(tensor_parallel_size=args.tp_size)
    except ConfigError as e:
        print(f"error: --tp-size: {e}", file=sys.stderr)
        return 2
    try:
        speculative = speculative_config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine = EngineConfig(
        model=ModelConfig(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, quantization=args.quantization),
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_bytes=_kv_cache_bytes(args),
            gpu_memory_utilization=args.gpu_memory_utilization,
            num_blocks=args.num_blocks,
            enable_prefix_caching=not args.no_prefix_caching,
            kv_cache_dtype=args.kv_cache_dtype,
            host_kv_cache_bytes=args.host_kv_cache_mb * 1024 * 1024 if args.host_kv_cache_mb else None,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, max_waiting=args.max_waiting,
            async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
        ),
        parallel=parallel,
        speculative=speculative,
    )
    worker_id = args.worker_id or f"{args.command}-{args.host}-{args.port}"
    config = WorkerConfig(
        role=args.command,
        worker_id=worker_id,
        address=args.advertise_address or f"{args.host}:{args.port}",
        engine=engine,
        transfer=TransferConfig(
            lease_seconds=args.lease_seconds, transfer_timeout_seconds=args.transfer_timeout, min_peer_gbps=args.min_kv_gbps,
            peer_backoff_seconds=args.kv_peer_backoff, max_peer_backoff_seconds=max(60.0, args.kv_peer_backoff),
        ),
        control_plane_url=_control_plane_url(args),
        capture_graphs_at_start=not args.lazy_graphs,
        heartbeat_ttl_seconds=args.registration_ttl,
        accepts_prefill=getattr(args, "accept_prefill", False),
    )
    listen = Listen(args.host, args.port, None if args.metrics_port < 0 else args.metrics_port, args.drain_seconds)
    tls = worker_tls(args.tls_cert, args.tls_key, args.tls_ca, args.tls_server_name)
    try:
        return _serve(serve_worker(config, listen, tls, args.worker_keys_file))
    except RankFailedError as e:  # the worker took itself down: health, registration and requests are settled
        print(f"error: {e}", file=sys.stderr)
        return 1


def speculative_config(args):
    from splitserve.config import ConfigError, SpeculativeConfig

    if args.speculative == "off":
        if args.draft_model is not None:
            raise ConfigError("--draft-model needs --speculative draft")
        return SpeculativeConfig()
    if args.draft_model is not None and not (args.draft_model / "config.json").is_file():
        raise ConfigError(f"--draft-model {args.draft_model}: no config.json there")
    return SpeculativeConfig(method=args.speculative, num_speculative_tokens=args.num_speculative_tokens, draft_model=args.draft_model)


def _kv_cache_bytes(args) -> int | None:
    from splitserve.config import default_kv_cache_bytes

    if args.kv_cache_mb is not None:
        return args.kv_cache_mb * 1024 * 1024
    return default_kv_cache_bytes(args.device)


def _serve(coro) -> int:
    """Runs a service; a control plane that cannot be reached or a port in use is a one-line error, not a traceback."""
    from splitserve.controlplane import ControlPlaneUnavailable
    from splitserve.services.grpc_server import PortInUse

    try:
        asyncio.run(coro)
    except ControlPlaneUnavailable as e:
        print(f"error: control plane unavailable: {e}", file=sys.stderr)
        return 2
    except PortInUse as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
