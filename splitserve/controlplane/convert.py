"""Proto messages of the embedded control plane <-> domain objects; nothing else sees the protos."""
from __future__ import annotations

from splitserve.controlplane.types import KVEvent, KVEventKind, KVTier, LiveWorker, WorkerInfo, WorkerLoad
from splitserve.v1 import controlplane_pb2 as pb

_KIND_TO_PB = {
    KVEventKind.STORED: pb.KV_EVENT_KIND_STORED,
    KVEventKind.REMOVED: pb.KV_EVENT_KIND_REMOVED,
    KVEventKind.CLEARED: pb.KV_EVENT_KIND_CLEARED,
}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}
_TIER_TO_PB = {KVTier.GPU: pb.KV_TIER_GPU, KVTier.HOST: pb.KV_TIER_HOST}
_TIER_FROM_PB = {v: k for k, v in _TIER_TO_PB.items()}


def info_to_pb(info: WorkerInfo) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        worker_id=info.worker_id,
        role=info.role,
        address=info.address,
        block_size=info.block_size,
        tp_size=info.tp_size,
        model=info.model,
        kv_cache_dtype=info.kv_cache_dtype,
        quantization=info.quantization,
        accepts_prefill=info.accepts_prefill,
        host_kv_blocks=info.host_kv_blocks,
    )


def info_from_pb(msg: pb.WorkerInfo) -> WorkerInfo:
    return WorkerInfo(
        msg.worker_id, msg.role, msg.address, msg.block_size, msg.tp_size, msg.model, msg.kv_cache_dtype, msg.quantization,  # type: ignore[arg-type]
        accepts_prefill=msg.accepts_prefill, host_kv_blocks=msg.host_kv_blocks,
    )


def load_to_pb(load: WorkerLoad) -> pb.WorkerLoad:
    return pb.WorkerLoad(
        num_waiting=load.num_waiting,
        num_running=load.num_running,
        num_tokens_in_flight=load.num_tokens_in_flight,
        num_free_blocks=load.num_free_blocks,
        num_total_blocks=load.num_total_blocks,
        sleeping=load.sleeping,
    )


def load_from_pb(msg: pb.WorkerLoad) -> WorkerLoad:
    return WorkerLoad(msg.num_waiting, msg.num_running, msg.num_tokens_in_flight, msg.num_free_blocks, msg.num_total_blocks, msg.sleeping)


def event_to_pb(event: KVEvent) -> pb.KVEvent:
    return pb.KVEvent(kind=_KIND_TO_PB[event.kind], block_hashes=event.block_hashes, tier=_TIER_TO_PB[event.tier])


def event_from_pb(msg: pb.KVEvent) -> KVEvent:
    if msg.kind not in _KIND_FROM_PB:
        raise ValueError(f"unknown KV event kind {msg.kind}")
    if msg.tier not in _TIER_FROM_PB:
        raise ValueError(f"unknown KV tier {msg.tier}")
    return KVEvent(_KIND_FROM_PB[msg.kind], tuple(msg.block_hashes), _TIER_FROM_PB[msg.tier])


def live_worker_to_pb(worker: LiveWorker) -> pb.LiveWorker:
    return pb.LiveWorker(info=info_to_pb(worker.info), load=load_to_pb(worker.load))


def live_worker_from_pb(msg: pb.LiveWorker) -> LiveWorker:
    return LiveWorker(info_from_pb(msg.info), load_from_pb(msg.load))
