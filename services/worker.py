"""What prefill and decode workers share: engine loop, KV transfer agent, control-plane presence, stats."""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

from splitserve.config import EngineConfig, TransferConfig
from splitserve.controlplane import ControlPlane, KVEvent, WorkerAgent, WorkerInfo, WorkerLoad
from splitserve.engine.engine import LLMEngine
from splitserve.kvtransfer import KVLayout, KVTransferAgent
from splitserve.services.engine_loop import EngineLoop
from splitserve.services.metrics import ServiceMetrics
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
    heartbeat_ttl_seconds: float = 3.0
    model_name: str = ""


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
    )


class WorkerRuntime:
    """Owns one worker's engine thread, NIXL agent and control-plane registration."""

    def __init__(self, config: WorkerConfig, control_plane: ControlPlane, metrics: ServiceMetrics, engine: LLMEngine | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.engine = engine or LLMEngine(config.engine)
        self.engine.block_pool.record_kv_events = True
        self.loop = EngineLoop(self.engine, on_kv_events=self._on_kv_events)
        kv_cache = self.engine.runner.kv_cache
        self.layout = KVLayout.from_kv_cache(kv_cache, model=config.model_name or config.engine.model.model_dir.name)
        # A fresh agent name per process: a restarted worker is a new peer, never a stale one.
        self.agent = KVTransferAgent(f"{config.worker_id}-{uuid.uuid4().hex[:8]}", kv_cache, self.layout)
        info = WorkerInfo(
            worker_id=config.worker_id, role=config.role, address=config.address, block_size=config.engine.cache.block_size, model=self.layout.model
        )
        self.presence = WorkerAgent(control_plane, info, self.load, lambda: list(self.engine.block_pool.cached), config.heartbeat_ttl_seconds)
        self.control_plane = control_plane
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
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
        await self.control_plane.close()

    def load(self) -> WorkerLoad:
        s = self.loop.stats
        return WorkerLoad(
            num_waiting=s.num_waiting + s.num_loading,
            num_running=s.num_running,
            num_tokens_in_flight=s.num_tokens_in_flight,
            num_free_blocks=s.num_free_blocks,
            num_total_blocks=s.num_total_blocks,
        )

    def _on_kv_events(self, events: list[tuple[str, bytes]]) -> None:
        grouped: list[KVEvent] = []
        for kind, block_hash in events:
            if grouped and grouped[-1].kind.value == kind:
                grouped[-1] = KVEvent(grouped[-1].kind, (*grouped[-1].block_hashes, block_hash))
            else:
                grouped.append(KVEvent(kind, (block_hash,)))
        self.spawn(self.presence.publish(grouped))

    async def _observe(self) -> None:
        last_prompt, last_hits = 0, 0
        while True:
            s = self.loop.stats
            self.metrics.observe_engine(s)
            self.metrics.prompt_tokens.labels(self.config.role).inc(s.num_prompt_tokens_computed + s.num_prefix_hit_tokens - last_prompt)
            self.metrics.prefix_hits.labels(self.config.role).inc(s.num_prefix_hit_tokens - last_hits)
            last_prompt, last_hits = s.num_prompt_tokens_computed + s.num_prefix_hit_tokens, s.num_prefix_hit_tokens
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
            **(extra or {}),
        )

    def transfer_metadata(self) -> worker_pb.TransferMetadata:
        return worker_pb.TransferMetadata(
            agent_name=self.agent.name, agent_metadata=self.agent.metadata(), layout=layout_to_proto(self.layout), worker_id=self.config.worker_id
        )
