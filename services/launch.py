"""Starts one service in this process and runs it until SIGINT/SIGTERM, then drains."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from splitserve.controlplane import ControlPlaneServicer, MemoryControlPlane, connect
from splitserve.models.arch import load_arch_config
from splitserve.services.grpc_server import ServiceHost
from splitserve.services.metrics import ServiceMetrics
from splitserve.services.router.generation import GenerationService, RouterSettings
from splitserve.services.router.request_input import ModelLimits
from splitserve.services.router.routing import make_policy
from splitserve.services.router.workers import WorkerDirectory
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


@dataclass(frozen=True)
class RouterConfig:
    model_dir: Path
    listen: Listen
    control_plane_url: str = "embedded"
    policy: str = "prefix_aware"
    prefill_threshold: int = 0
    block_size: int = 16
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_model_len: int | None = None
    max_inflight: int = 1024


def _announce(role: str, host: str, port: int, metrics_port: int | None) -> None:
    line = READY.format(role=role, address=f"{host}:{port}")
    if metrics_port is not None:
        line += f" (metrics on :{metrics_port})"
    print(line, flush=True)


async def serve_router(config: RouterConfig) -> None:
    metrics = ServiceMetrics("router")
    arch = load_arch_config(config.model_dir)
    tokenizer = load_tokenizer(config.model_dir)
    if config.control_plane_url in ("embedded", "memory"):
        control_plane = MemoryControlPlane()
    else:
        control_plane = await connect(config.control_plane_url)
    limits = ModelLimits(
        vocab_size=arch.vocab_size,
        max_model_len=config.max_model_len or arch.max_position_embeddings,
        max_tokens_limit=config.max_tokens_limit,
        default_max_tokens=config.default_max_tokens,
    )
    settings = RouterSettings(
        model_name=config.model_dir.name,
        architecture=arch.architecture,
        limits=limits,
        block_size=config.block_size,
        eos_token_ids=tuple(sorted(arch.eos_token_ids)),
        prefill_threshold=config.prefill_threshold,
        max_inflight=config.max_inflight,
    )
    workers = WorkerDirectory(control_plane)
    service = GenerationService(settings, tokenizer, workers, make_policy(config.policy), metrics)
    host = ServiceHost(["splitserve.v1.Generation", "splitserve.v1.ControlPlane"], metrics.registry)
    generation_pb2_grpc.add_GenerationServicer_to_server(service, host.server)
    # Workers on this machine register here when no shared store is configured.
    ControlPlaneServicer(control_plane).add_to_server(host.server)
    port = host.bind(f"{config.listen.host}:{config.listen.port}")
    metrics_port = await host.start(config.listen.metrics_port)
    host.stop_on_signals(config.listen.drain_seconds)
    _announce("router", config.listen.host, port, metrics_port)
    await host.server.wait_for_termination()
    await workers.close()
    await control_plane.close()


async def serve_worker(config: WorkerConfig, listen: Listen) -> None:
    from splitserve.services.decode.service import DecodeService
    from splitserve.services.prefill.service import PrefillService

    metrics = ServiceMetrics(config.role)
    control_plane = await connect(config.control_plane_url, timeout_seconds=2.0)
    name = "splitserve.v1.PrefillWorker" if config.role == "prefill" else "splitserve.v1.DecodeWorker"
    host = ServiceHost([name], metrics.registry)
    port = host.bind(f"{listen.host}:{listen.port}")
    if config.address.endswith(":0"):  # advertise the port actually bound
        config = _with_address(config, f"{config.address.rsplit(':', 1)[0]}:{port}")
    runtime = await asyncio.to_thread(WorkerRuntime, config, control_plane, metrics)
    if config.role == "prefill":
        service = PrefillService(runtime)
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(service, host.server)
    else:
        service = DecodeService(runtime)
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(service, host.server)
    metrics_port = await host.start(listen.metrics_port)
    await runtime.start()
    await service.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    _announce(config.role, listen.host, port, metrics_port)
    await stopping.wait()
    # Drain: leave the routing table first, stop taking calls, let in-flight ones finish.
    log.info("%s %s draining", config.role, config.worker_id)
    await runtime.presence.stop()
    await host.set_serving(False)
    if config.role == "prefill":
        await asyncio.gather(host.server.stop(listen.drain_seconds), service.drain())
    else:
        await host.server.stop(listen.drain_seconds)
        await service.close()
    await runtime.stop()


def _with_address(config: WorkerConfig, address: str) -> WorkerConfig:
    from dataclasses import replace

    return replace(config, address=address)
