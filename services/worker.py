"""What prefill and decode workers share: engine loop, KV transfer agent, control-plane presence, stats."""
from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from splitserve.config import EngineConfig, TransferConfig
from splitserve.controlplane import ControlPlane, KVEvent, WorkerAgent, WorkerInfo, WorkerLoad
from splitserve.controlplane.interface import DEFAULT_REGISTRATION_TTL_SECONDS
from splitserve.engine.engine import LLMEngine
from splitserve.engine.warmup import warm_up
from splitserve.kvtransfer import KVLayout, KVTransferAgent
from splitserve.parallel import KVAgentSpec, KVGroup, PeerWorker, RankAgent, TPOptions, make_runner
from splitserve.services.engine_loop import EngineLoop, EngineStats
from splitserve.services.metrics import ServiceMetrics
from splitserve.services.sleep import SleepController
from splitserve.v1 import worker_pb2 as worker_pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    role: str  # "prefill" | "decode"
    worker_id: str
    address: str  # host:port others reach this worker's gRPC at
    engine: EngineConfig
    transfer: TransferConfig = TransferConfig()
    control_plane_url: str = "embedded"
    heartbeat_ttl_seconds: float = DEFAULT_REGISTRATION_TTL_SECONDS
    model_name: str = ""
    tp: TPOptions = TPOptions()  # how the ranks run when engine.parallel.tensor_parallel_size > 1
    capture_graphs_at_start: bool = True  # False: each decode graph is captured when first needed
    accepts_prefill: bool = False  # decode role only: also serve PrefillWorker for other decode workers (mixed role)

    def __post_init__(self) -> None:
        if self.accepts_prefill and self.role != "decode":
            raise ValueError("--accept-prefill is for decode workers (a prefill worker prefills already)")


def layout_to_proto(layout: KVLayout) -> worker_pb.KVLayout:
    return worker_pb.KVLayout(
        model=layout.model,
        dtype=layout.dtype,
        block_size=layout.block_size,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        tp_size=layout.tp_size,
        layout=layout.layout,
        total_num_kv_heads=layout.total_num_kv_heads,
        kv_scales=layout.kv_scales,
    )


def layout_from_proto(msg: worker_pb.KVLayout) -> KVLayout:
    return KVLayout(
        model=msg.model,
        dtype=msg.dtype,
        block_size=msg.block_size,
        num_layers=msg.num_layers,
        num_kv_heads=msg.num_kv_heads,
        head_dim=msg.head_dim,
        tp_size=msg.tp_size,
        layout=msg.layout,
        total_num_kv_heads=msg.total_num_kv_heads,
        kv_scales=msg.kv_scales,
    )


def peer_from_proto(meta: worker_pb.TransferMetadata) -> PeerWorker:
    """A peer worker's agents, one per TP rank; a peer that lists none has one, rank 0."""
    ranks = [RankAgent(r.tp_rank, r.agent_name, r.agent_metadata) for r in meta.ranks]
    return PeerWorker(meta.worker_id, layout_from_proto(meta.layout), tuple(ranks or [RankAgent(0, meta.agent_name, meta.agent_metadata)]))


def group_kv_events(events: list[tuple]) -> list[KVEvent]:
    """One KVEvent per run of the prefix cache's events of one kind and tier, in order: (kind,
    hash) for the GPU cache, (kind, hash, "host") for the host tier. Each is built once: growing
    one event per block rebuilt and re-checked its hashes, quadratic in the blocks of a step (a
    tenth of a decode worker's event loop under load on an H100)."""
    return [
        KVEvent(kind, tuple(e[1] for e in run), tier)
        for (kind, tier), run in itertools.groupby(events, key=lambda e: (e[0], e[2] if len(e) > 2 else "gpu"))
    ]


class WorkerRuntime:
    """Owns one worker's engine thread, NIXL agent and control-plane registration."""

    def __init__(self, config: WorkerConfig, control_plane: ControlPlane, metrics: ServiceMetrics, engine: LLMEngine | None = None) -> None:
        self.config = config
        self.metrics = metrics
        model_name = config.model_name or config.engine.model.model_dir.name
        # A fresh agent name per process: a restarted worker is a new peer, never a stale one.
        agent_name = f"{config.worker_id}-{uuid.uuid4().hex[:8]}"
        # TP > 1: this process is rank 0 and starts the other ranks, each with an agent of its own.
        self.engine = engine or LLMEngine(config.engine, make_runner(config.engine, KVAgentSpec(agent_name, model_name), config.tp))
        if engine is None and config.engine.model.device.startswith("cuda"):
            warm_up(self.engine.runner, config.engine.scheduler.max_num_seqs, config.capture_graphs_at_start)
        self.engine.block_pool.record_kv_events = True
        host_tier = self.engine.host_tier
        if host_tier is not None:
            host_tier.record_kv_events = True
        self.loop = EngineLoop(self.engine, on_kv_events=self._on_kv_events)
        runner = self.engine.runner
        tp_size = config.engine.parallel.tensor_parallel_size
        self.layout = KVLayout.from_kv_cache(
            runner.kv_cache, model=model_name, tp_size=tp_size, total_num_kv_heads=runner.arch.num_kv_heads, kv_scales=runner.kv_scales_id
        )
        self.agent = KVTransferAgent(agent_name, runner.kv_cache, self.layout)
        ranks = getattr(runner, "ranks", [])
        self.kv = KVGroup(self.agent, ranks, [RankAgent(i.rank, i.agent_name, i.agent_metadata) for i in getattr(runner, "infos", [])])
        # Set when a TP rank dies: the worker must go (serve_worker takes it down).
        self.failed = asyncio.Event()
        self._event_loop: asyncio.AbstractEventLoop | None = None
        if hasattr(runner, "on_failure"):
            runner.on_failure(self._on_rank_failure)
        info = WorkerInfo(
            worker_id=config.worker_id, role=config.role, address=config.address, block_size=config.engine.cache.block_size,
            tp_size=tp_size, model=self.layout.model, kv_cache_dtype=self.layout.dtype, quantization=runner.quantization,
            accepts_prefill=config.accepts_prefill,
            host_kv_blocks=host_tier.num_blocks if host_tier is not None else 0,
        )
        self.presence = WorkerAgent(
            control_plane, info, self.load, lambda: list(self.engine.block_pool.cached), config.heartbeat_ttl_seconds,
            get_host_block_hashes=host_tier.cached_hashes if host_tier is not None else None,
        )
        self.control_plane = control_plane
        self.vllm_series = metrics.engine_series(model_name)
        self._tasks: set[asyncio.Task] = set()
        self.sleep_mode = SleepController(self)
        # Services add what they must do as the worker falls asleep (after the drain) and wakes.
        self.on_sleep: list[Callable[[], Awaitable[None]]] = []
        self.on_wake: list[Callable[[], Awaitable[None]]] = []

    async def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        if getattr(self.engine.runner, "failed", False):
            self.failed.set()
        self.loop.start()
        await self.presence.start()
        self.spawn(self._observe())

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        await self.presence.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.loop.stop()
        self.agent.close()
        if hasattr(self.engine.runner, "close"):
            await asyncio.to_thread(self.engine.runner.close)
        await self.control_plane.close()

    def _on_rank_failure(self, error: Exception) -> None:
        """Any thread: a TP rank is gone. New requests are refused at once (UNAVAILABLE);
        the engine thread's step fails those in flight; serve_worker takes the worker down."""
        self.loop.error = error
        if self._event_loop is not None:
            self._event_loop.call_soon_threadsafe(self.failed.set)

    def load(self) -> WorkerLoad:
        s = self.loop.stats
        return WorkerLoad(
            num_waiting=s.num_waiting + s.num_loading,
            num_running=s.num_running,
            num_tokens_in_flight=s.num_tokens_in_flight,
            num_free_blocks=s.num_free_blocks,
            num_total_blocks=s.num_total_blocks,
            sleeping=self.sleep_mode.sleeping,
        )

    def num_pinned(self) -> int:
        """Finished requests whose KV is held for another worker to read."""
        return self.loop.stats.num_held

    async def before_sleep(self) -> None:
        for hook in self.on_sleep:
            await hook()

    async def after_wake(self) -> None:
        for hook in self.on_wake:
            await hook()

    def _on_kv_events(self, events: list[tuple[str, bytes]]) -> None:
        self.spawn(self.presence.publish(group_kv_events(events)))

    async def _observe(self) -> None:
        role = self.config.role
        last = EngineStats()
        while True:
            s = self.loop.stats
            self.metrics.observe_engine(s)
            # The engine counts from its start; the Prometheus counters take the increments.
            hits = s.num_prefix_hit_tokens - last.num_prefix_hit_tokens
            self.metrics.prompt_tokens.labels(role).inc(s.num_prompt_tokens_computed - last.num_prompt_tokens_computed + hits)
            self.metrics.prefix_hits.labels(role).inc(hits)
            self.metrics.preemptions.labels(role).inc(s.num_preemptions - last.num_preemptions)
            self.metrics.discarded_rows.labels(role).inc(s.num_discarded_rows - last.num_discarded_rows)
            times = self.loop.request_times
            self.vllm_series.observe(s, last, [times.popleft() for _ in range(len(times))])
            last = s
            await asyncio.sleep(0.5)

    def stats(self, extra: dict | None = None) -> worker_pb.WorkerStats:
        s = self.loop.stats
        return worker_pb.WorkerStats(
            worker_id=self.config.worker_id,
            role=self.config.role,
            num_waiting=s.num_waiting + s.num_loading,
            num_running=s.num_running,
            num_total_blocks=s.num_total_blocks,
            num_free_blocks=s.num_free_blocks,
            num_pinned_blocks=s.num_pinned_blocks,
            num_prompt_tokens_computed=s.num_prompt_tokens_computed,
            num_prefix_hit_tokens=s.num_prefix_hit_tokens,
            num_requests_finished=self.loop.num_finished,
            **_spec_fields(s),
            **(extra or {}),
        )

    def transfer_metadata(self) -> worker_pb.TransferMetadata:
        ranks = [worker_pb.RankAgent(tp_rank=r.tp_rank, agent_name=r.agent_name, agent_metadata=r.agent_metadata) for r in self.kv.agents()]
        return worker_pb.TransferMetadata(
            agent_name=self.agent.name, agent_metadata=ranks[0].agent_metadata, layout=layout_to_proto(self.layout),
            worker_id=self.config.worker_id, ranks=ranks,
        )


def _spec_fields(s: EngineStats) -> dict:
    if s.spec is None:
        return {}
    return dict(
        num_spec_verifications=s.spec.num_verifications,
        num_spec_draft_tokens=s.spec.num_draft_tokens,
        num_spec_accepted_tokens=s.spec.num_accepted_tokens,
    )
