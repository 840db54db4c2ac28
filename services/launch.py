"""Starts one service in this process and runs it until SIGINT/SIGTERM, then drains."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc

from splitserve.controlplane import EMBEDDED_URLS, ControlPlane, ControlPlaneServicer, ControlPlaneUnavailable, MemoryControlPlane, RemoteControlPlane, connect
from splitserve.models.arch import load_arch_config
from splitserve.services.grpc_server import PortInUse, ServiceHost
from splitserve.services.metrics import ServiceMetrics
from splitserve.services.router.auth import ApiKeys, ServiceEdge
from splitserve.services.router.generation import GenerationService, RouterSettings
from splitserve.services.router.placement import EngineBudget, Placer, parse_slo
from splitserve.services.router.request_input import ModelLimits, longest_token_chars
from splitserve.services.router.routing import make_policy
from splitserve.services.router.workers import WorkerDirectory
from splitserve.services.security import SecurityConfigError, TLSConfig, dial, read_worker_key, router_to_workers, with_key, worker_to_peers
from splitserve.services.worker import WorkerConfig, WorkerRuntime
from splitserve.tokenizer import load_tokenizer
from splitserve.v1 import generation_pb2_grpc, worker_pb2_grpc

log = logging.getLogger(__name__)

READY = "splitserve {role} listening on {address}"


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (the ready line says which)
    metrics_port: int | None = None
    drain_seconds: float = 30.0


# Calls the router's gRPC server takes beyond --max-inflight generations (control plane, health,
# reflection); past the sum grpcio refuses a call RESOURCE_EXHAUSTED before it reaches any handler.
RPC_HEADROOM = 64


@dataclass(frozen=True)
class RouterConfig:
    model_dir: Path
    listen: Listen
    control_plane_url: str = "embedded"
    policy: str = "prefix_aware"
    prefill_threshold: int = 0
    placement_profile: Path | None = None  # a profile JSON turns on per-request placement (router/placement.py)
    placement_slo: str = "ttft:500,itl:50"
    placement_budget: int = 8192  # the workers' max_num_batched_tokens, for the placement estimates
    block_size: int = 16
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_model_len: int | None = None
    max_inflight: int = 1024
    http_port: int | None = None  # the OpenAI-compatible HTTP API; None: off, 0: any free port
    served_model_name: str | None = None  # default: the checkpoint folder's name
    tls: TLSConfig | None = None  # public listeners (cert/key) and TLS to the workers (ca); services/security.py
    api_keys_file: Path | None = None  # clients' keys; None: no authentication
    worker_keys_file: Path | None = None  # workers' keys (the embedded control plane; the first one dials workers)
    trust_request_chat_template: bool = False  # let a chat request bring its own template (it runs in this process)


def _announce(role: str, host: str, port: int, metrics_port: int | None, *notes: str) -> None:
    line = READY.format(role=role, address=f"{host}:{port}")
    if metrics_port is not None:
        line += f" (metrics on :{metrics_port})"
    print(line + "".join(f" ({note})" for note in notes), flush=True)


async def serve_router(config: RouterConfig) -> None:
    metrics = ServiceMetrics("router")
    arch = load_arch_config(config.model_dir)
    tokenizer = load_tokenizer(config.model_dir)
    embedded = config.control_plane_url in EMBEDDED_URLS
    client_keys = ApiKeys(config.api_keys_file) if config.api_keys_file is not None else None
    worker_keys = ApiKeys(config.worker_keys_file, what="worker keys file") if config.worker_keys_file is not None else None
    if embedded and client_keys is not None and worker_keys is None:
        raise SecurityConfigError(
            "--api-keys-file with the embedded control plane needs --worker-keys-file: workers register with a key of their own, never a client's"
        )
    worker_key = read_worker_key(config.worker_keys_file)
    if embedded:
        control_plane = MemoryControlPlane()
    else:
        # Another router's embedded store takes worker keys only: this router presents its own.
        control_plane = await _remote_control_plane(config.control_plane_url, config.tls, worker_key)
        await _check_admitted(control_plane, config.control_plane_url)
    limits = ModelLimits(
        vocab_size=arch.vocab_size,
        max_model_len=config.max_model_len or arch.max_position_embeddings,
        max_tokens_limit=config.max_tokens_limit,
        default_max_tokens=config.default_max_tokens,
        max_token_chars=longest_token_chars(tokenizer),
    )
    settings = RouterSettings(
        model_name=config.served_model_name or config.model_dir.name,
        architecture=arch.architecture,
        limits=limits,
        block_size=config.block_size,
        eos_token_ids=tuple(sorted(arch.eos_token_ids)),
        prefill_threshold=config.prefill_threshold,
        max_inflight=config.max_inflight,
        trust_request_chat_template=config.trust_request_chat_template,
    )
    workers = WorkerDirectory(control_plane, config.block_size, security=router_to_workers(config.tls, worker_key))
    placer = None
    if config.placement_profile is not None:
        placer = Placer.from_files(config.placement_profile, config.placement_profile, parse_slo(config.placement_slo),
                                   EngineBudget(config.placement_budget, config.block_size), metrics.registry)
    service = GenerationService(settings, tokenizer, workers, make_policy(config.policy), metrics, placer)
    host = ServiceHost(
        ["splitserve.v1.Generation", *(["splitserve.v1.ControlPlane"] if embedded else [])], metrics.registry,
        max_receive_bytes=limits.max_request_bytes, max_concurrent_rpcs=config.max_inflight + RPC_HEADROOM,
    )
    # Clients' keys open Generation only, workers' keys the control plane only (docs/security.md);
    # health and reflection stay open for probes.
    rejected = lambda: metrics.error("unauthenticated")  # noqa: E731
    generation_pb2_grpc.add_GenerationServicer_to_server(service, ServiceEdge(host.server, client_keys, rejected))
    if embedded:  # workers on this machine register here when no shared store is configured
        ControlPlaneServicer(control_plane).add_to_server(ServiceEdge(host.server, worker_keys, rejected, credential="worker key"))
    port = host.bind(f"{config.listen.host}:{config.listen.port}", config.tls.server_credentials(False) if config.tls else None)
    draining = asyncio.Event()
    http = None
    if config.http_port is not None:
        from splitserve.services.router.openai import HttpServer, build_app

        app = build_app(service, client_keys, is_serving=lambda: not draining.is_set(), worker_keys=worker_keys)
        try:
            http = HttpServer(app, config.listen.host, config.http_port, config.tls, config.listen.drain_seconds)
        except OSError as e:
            raise PortInUse(f"cannot listen on {config.listen.host}:{config.http_port} (HTTP): {e.strerror}") from None
    metrics_port = await host.start(config.listen.metrics_port)
    if http is not None:
        await http.start()
    _stop_on_signals(host, http, draining, config.listen.drain_seconds)
    notes = [] if http is None else [f"OpenAI-compatible HTTP API at {http.scheme}://{config.listen.host}:{http.port}/v1"]
    _announce("router", config.listen.host, port, metrics_port, *notes)
    await host.server.wait_for_termination()
    if http is not None:
        await http.stop()
    await workers.close()
    await control_plane.close()


def _stop_on_signals(host: ServiceHost, http, draining: asyncio.Event, grace: float) -> None:
    """SIGINT/SIGTERM drain the gRPC and HTTP listeners together."""

    async def stop() -> None:
        draining.set()
        await asyncio.gather(host.stop(grace), *([http.stop()] if http is not None else []))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(stop()))


async def serve_worker(config: WorkerConfig, listen: Listen, tls: TLSConfig | None = None, worker_keys_file: Path | None = None) -> None:
    """``tls``: what the worker serves with and how it dials its peers (services/security.py);
    ``worker_keys_file``: the worker credential: callers of this worker must present one of its
    keys, and it presents the first to the control plane and to its peers (docs/security.md)."""
    from splitserve.services.decode.service import DecodeService
    from splitserve.services.prefill.service import PrefillService

    metrics = ServiceMetrics(config.role)
    keys = ApiKeys(worker_keys_file, what="worker keys file") if worker_keys_file is not None else None
    worker_key = read_worker_key(worker_keys_file)
    control_plane = await _remote_control_plane(config.control_plane_url, tls, worker_key)
    names = ["splitserve.v1.PrefillWorker"] if config.role == "prefill" else ["splitserve.v1.DecodeWorker"]
    if config.accepts_prefill:  # mixed role: one engine behind both services
        names.append("splitserve.v1.PrefillWorker")
    host = ServiceHost(names, metrics.registry)
    edge = ServiceEdge(host.server, keys, lambda: metrics.error("unauthenticated"), credential="worker key")
    port = host.bind(f"{listen.host}:{listen.port}", tls.server_credentials(verify_clients=True) if tls else None)
    if config.address.endswith(":0"):  # advertise the port actually bound
        config = dataclasses.replace(config, address=f"{config.address.rsplit(':', 1)[0]}:{port}")
    runtime = await asyncio.to_thread(WorkerRuntime, config, control_plane, metrics)
    if config.role == "prefill":
        service = PrefillService(runtime)
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(service, edge)
    else:
        service = DecodeService(runtime, security=worker_to_peers(tls, worker_key))
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(service, edge)
    helper = None
    if config.accepts_prefill:
        helper = PrefillService(runtime)
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(helper, edge)
    metrics_port = await host.start(listen.metrics_port)
    await runtime.start()
    await service.start()
    if helper is not None:
        await helper.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    _announce(config.role, listen.host, port, metrics_port, f"async scheduling {'on' if runtime.engine.async_scheduling else 'off'}")
    failed = asyncio.ensure_future(runtime.failed.wait())
    await asyncio.wait([asyncio.ensure_future(stopping.wait()), failed], return_when=asyncio.FIRST_COMPLETED)
    if failed.done():
        await _take_down(config, runtime, host, service)
    # Drain: leave the routing table first, stop taking calls, let in-flight ones finish.
    log.info("%s %s draining", config.role, config.worker_id)
    await runtime.presence.stop()
    await host.set_serving(False)
    if config.role == "prefill":
        await asyncio.gather(host.server.stop(listen.drain_seconds), service.drain())
    else:
        # Routers keep writing on their streams while their requests finish (a cancel when a
        # client leaves); a stopping server would fail those writes, so it stops after them.
        await asyncio.gather(service.drain(listen.drain_seconds), *([helper.drain()] if helper is not None else []))
        await host.server.stop(1.0)
        await service.close()
    await runtime.stop()


async def _check_admitted(control_plane: ControlPlane, url: str) -> None:
    """Fails the start, in one line, when the store refuses this process's credential (it would
    otherwise fail every request with the store's refusal)."""
    try:
        await control_plane.live_workers()
    except grpc.aio.AioRpcError as e:
        if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise SecurityConfigError(f"the control plane at {url} refused this router: {e.details()} (give it the platform's --worker-keys-file)") from None
        raise


async def _remote_control_plane(url: str, tls: TLSConfig | None, api_key: str | None, timeout: float = 2.0) -> ControlPlane:
    """A router's embedded store over TLS (``grpcs://``) or with a worker key; any other store as connect() opens it."""
    scheme, _, target = url.partition("://")
    if scheme not in ("grpc", "grpcs") or (scheme == "grpc" and api_key is None):
        return await connect(url, timeout_seconds=timeout)
    # grpcs: the router's certificate is checked against --tls-ca (else the system's roots).
    security = with_key((tls or TLSConfig()).peer_channels() if scheme == "grpcs" else None, api_key)
    channel = dial(target, security)
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
    except TimeoutError:
        await channel.close()
        raise ControlPlaneUnavailable(f"no control plane answers at {url} (is the router running, and does its certificate verify?)") from None
    return RemoteControlPlane(channel, target, timeout)


async def _take_down(config: WorkerConfig, runtime: WorkerRuntime, host: ServiceHost, service) -> None:
    """A TP rank died: the group cannot compute any more. Health turns NOT_SERVING and the
    worker deregisters first (routers stop sending), requests in flight fail UNAVAILABLE
    (the engine's step raised; new ones are refused), then the process exits non-zero."""
    error = runtime.engine.runner.error
    log.error("%s %s going down: %s", config.role, config.worker_id, error)
    await host.set_serving(False)
    await runtime.presence.stop()
    await host.server.stop(2.0)
    if config.role != "prefill":
        await service.close()
    await runtime.stop()
    raise error

