"""A worker's transfer agent over its KV cache: peers, block reads and writes, notifications.

Each peer gets its path at ``add_peer``: CUDA IPC for a GPU of this host, NIXL otherwise
(``kvtransfer.paths``). Reads go the peer's path; writes and notifications always use NIXL.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from splitserve.kvtransfer import cuda_ipc
from splitserve.kvtransfer.cuda_ipc import IpcCopies
from splitserve.kvtransfer.descriptors import HeadSlice, Span, check_block_ids, coalesce, head_slice_spans, runs_to_spans
from splitserve.kvtransfer.errors import (
    BadMetadataError,
    InvalidBlocksError,
    KVTransferError,
    UnknownPeerError,
    translate_nixl_errors,
)
from splitserve.kvtransfer.layout import BLOCK_MAJOR, KVLayout, block_bytes
from splitserve.kvtransfer.metadata import AgentMetadata, CacheRegion
from splitserve.kvtransfer.paths import CUDA_IPC, NIXL, choose_path
from splitserve.kvtransfer.progress import progress_thread_delay
from splitserve.kvtransfer.transfer import PendingTransfer, TransferResult

logger = logging.getLogger(__name__)

# The handshake's timed read: on GPUs long enough to see a slow path, short on a fast one; in
# host memory (CPU-only machines, nothing to warn about) small, so a busy machine never times it out.
PROBE_BYTES = {"VRAM": 16 * 1024 * 1024, "DRAM": 1024 * 1024}


class Notification(NamedTuple):
    peer: str  # the agent that sent it
    message: bytes


@dataclass(frozen=True)
class _Peer:
    region: CacheRegion
    layout: KVLayout
    metadata: bytes  # exactly as received: identical bytes mean the same incarnation
    path: str  # CUDA_IPC or NIXL, for reads
    same_host: bool
    ipc_cache: torch.Tensor | None = None  # CUDA_IPC: the peer's cache, opened here, flat uint8


class KVTransferAgent:
    """Registers one worker's KV cache with NIXL and moves whole blocks to and from peers.

    The cache is one contiguous tensor [num_blocks, num_kv_heads, num_layers, 2, block_size,
    head_dim] (block_major): block b is ``block_bytes`` at offset ``b * block_bytes``, so a
    run of consecutive blocks is one descriptor. Not thread-safe: use one agent from one
    thread (the event loop with the ``*_async`` methods, or a single transfer thread).

    Every transfer carries its own deadline. A READ that misses it leaves its local blocks
    *in doubt* (the stalled peer may still complete the copy later, and releasing NIXL's
    handle does not stop it): they come back from ``reclaim()`` once NIXL reports the
    transfer over, or once the peer is removed or replaced (its old process is gone).
    """

    def __init__(
        self, name: str, kv_cache: torch.Tensor, layout: KVLayout, *, backend: str = "UCX", cuda_ipc: bool = True
    ) -> None:
        from nixl._api import nixl_agent, nixl_agent_config  # heavy import, only when used

        if layout.layout != BLOCK_MAJOR:
            raise ValueError(f"only the {BLOCK_MAJOR!r} layout can be registered, got {layout.layout!r}")
        if KVLayout.from_kv_cache(kv_cache, model=layout.model, tp_size=layout.tp_size,
                                  tp_rank=layout.tp_rank, total_num_kv_heads=layout.total_num_kv_heads,
                                  kv_scales=layout.kv_scales) != layout:
            raise ValueError(f"kv_cache of shape {tuple(kv_cache.shape)} does not match {layout}")
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be contiguous to be registered as one region")
        self.name = name
        self.layout = layout
        with progress_thread_delay():
            self._nixl = nixl_agent(name, nixl_agent_config(backends=[backend]))
        if backend not in self._nixl.backends:
            raise KVTransferError(f"NIXL backend {backend!r} is not available")
        # NIXL keeps raw pointers: the tensor must outlive the registration.
        self._kv_cache = kv_cache
        with translate_nixl_errors("registering the KV cache", name):
            self._registration = self._nixl.register_memory(kv_cache)
        self.region = CacheRegion(
            mem_type="VRAM" if kv_cache.is_cuda else "DRAM",
            device_id=kv_cache.device.index or 0,
            base_addr=kv_cache.data_ptr(),
            num_blocks=kv_cache.shape[0],
            block_bytes=block_bytes(kv_cache),
        )
        # The probe's destination: a read must never land in blocks the engine may be using.
        probe_bytes = PROBE_BYTES[self.region.mem_type]
        self._scratch = torch.empty(probe_bytes, dtype=torch.uint8, device=kv_cache.device)
        with translate_nixl_errors("registering the probe buffer", name):
            self._scratch_registration = self._nixl.register_memory(self._scratch)
        self._scratch_region = CacheRegion(self.region.mem_type, self.region.device_id, self._scratch.data_ptr(), 1, probe_bytes)
        self._export = _export(kv_cache) if cuda_ipc else None
        self._flat = kv_cache.view(-1).view(torch.uint8)  # the IPC path's copies address bytes
        self._stream: torch.cuda.Stream | None = None  # the IPC path's copies, off the engine's stream
        self._peers: dict[str, _Peer] = {}
        self._given_up: list[PendingTransfer | IpcCopies] = []  # timed out, not yet settled
        self._reclaimable: list[int] = []  # local blocks whose given-up READ is over

    # -- peers ---------------------------------------------------------------------------

    def metadata(self) -> bytes:
        """What a peer passes to ``add_peer`` (proto ``TransferMetadata.agent_metadata``)."""
        return AgentMetadata(self.region, self._agent.get_agent_metadata(), self._export).encode()

    def add_peer(self, peer_name: str, metadata: bytes, peer_layout: KVLayout) -> None:
        """Makes ``peer_name`` reachable. Refuses an incompatible layout before touching NIXL.
        Fresh metadata for a known peer (it restarted) replaces the stale incarnation;
        the same metadata again is a no-op."""
        if peer_name == self.name:
            raise BadMetadataError(f"peer name {peer_name!r} is this agent's own name")
        self.layout.check_compatible(peer_layout, peer_name)
        decoded = AgentMetadata.decode(metadata)
        if decoded.region.block_bytes != peer_layout.block_bytes:  # equal to ours unless TP sizes differ
            raise BadMetadataError(
                f"peer {peer_name!r} registered {decoded.region.block_bytes}-byte blocks, "
                f"its layout says {peer_layout.block_bytes}"
            )
        known = self._peers.get(peer_name)
        if known is not None and known.metadata == metadata:
            return
        if known is not None:
            # NIXL refuses to load metadata over a loaded agent of the same name.
            logger.info("peer %r restarted: replacing its metadata", peer_name)
            self.remove_peer(peer_name)
        with translate_nixl_errors("adding peer", peer_name):
            loaded = self._agent.add_remote_agent(decoded.nixl_metadata)
        loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
        if loaded != peer_name:
            self._agent.remove_remote_agent(loaded)
            raise BadMetadataError(f"metadata for peer {peer_name!r} names agent {loaded!r}")
        path, ipc_cache = self._open_path(peer_name, decoded)
        same_host = decoded.ipc is not None and self._export is not None and decoded.ipc.host_id == self._export.host_id
        self._peers[peer_name] = _Peer(decoded.region, peer_layout, bytes(metadata), path, same_host, ipc_cache)
        logger.info("peer %r added: reads over %s", peer_name, path)

    def path(self, peer_name: str) -> str:
        """How reads from this peer move: ``paths.CUDA_IPC`` or ``paths.NIXL``."""
        return self._peer(peer_name).path

    def peer_region(self, peer_name: str) -> CacheRegion:
        return self._peer(peer_name).region

    def same_host(self, peer_name: str) -> bool:
        """Whether the peer is known to run on this host (both sides on GPUs: known by boot id)."""
        return self._peer(peer_name).same_host

    async def probe(self, peer_name: str, timeout: float) -> TransferResult:
        """Times a read of up to PROBE_BYTES of the peer's cache into a scratch buffer of ours
        (after one untimed read that sets the path up), for the handshake's bandwidth check.
        Each read has ``timeout``; one that misses it raises TransferTimeoutError."""
        remote = self._peer(peer_name).region
        spans = [Span(0, 0, min(self._scratch_region.num_bytes, remote.num_bytes))]
        await self._post("READ", peer_name, spans, (), b"", time.perf_counter(), scratch=True).wait_async(timeout)
        return await self._post("READ", peer_name, spans, (), b"", time.perf_counter(), scratch=True).wait_async(timeout)

    def _open_path(self, peer_name: str, decoded: AgentMetadata) -> tuple[str, torch.Tensor | None]:
        path = choose_path(self.region, self._export, decoded.region, decoded.ipc, cuda_ipc.local_device_of)
        if path != CUDA_IPC:
            return path, None
        try:
            return path, cuda_ipc.import_cache(decoded.ipc, cuda_ipc.local_device_of(decoded.ipc.device_uuid))
        except (RuntimeError, OSError) as e:
            logger.warning("peer %r is on this host but its CUDA IPC handle cannot be opened here (%s): reads go over NIXL", peer_name, e)
            return NIXL, None

    def remove_peer(self, peer_name: str) -> None:
        """Forgets a peer whose process is gone. Its given-up transfers are settled: their
        local blocks come back from the next ``reclaim()``."""
        if self._peers.pop(peer_name, None) is None:
            raise UnknownPeerError(f"peer {peer_name!r} is not known")
        # A given-up IPC copy still runs on our GPU: it settles when its event passes, not now.
        for transfer in [t for t in self._given_up if t.peer == peer_name and not isinstance(t, IpcCopies)]:
            self._given_up.remove(transfer)
            transfer.release()
            self._settled(transfer)
        with translate_nixl_errors("removing peer", peer_name):
            self._agent.remove_remote_agent(peer_name)

    @property
    def peers(self) -> frozenset[str]:
        return frozenset(self._peers)

    # -- transfers -----------------------------------------------------------------------

    def read_blocks(
        self, peer: str, remote_block_ids: Sequence[int], local_block_ids: Sequence[int],
        *, notify: bytes = b"", timeout: float, heads: HeadSlice | None = None,
    ) -> TransferResult:
        """Copies the peer's blocks into ours (pull). ``notify`` reaches the peer's
        ``poll_notifications()`` once the data has landed, so it can free its blocks.
        ``heads``: copy only these KV heads of each block (peers of different TP sizes)."""
        return self._start("READ", peer, remote_block_ids, local_block_ids, notify, heads).wait(timeout)

    def write_blocks(
        self, peer: str, remote_block_ids: Sequence[int], local_block_ids: Sequence[int],
        *, notify: bytes = b"", timeout: float,
    ) -> TransferResult:
        """Copies our blocks into the peer's (push); ``notify`` tells the peer they landed."""
        return self._start("WRITE", peer, remote_block_ids, local_block_ids, notify).wait(timeout)

    async def read_blocks_async(
        self, peer: str, remote_block_ids: Sequence[int], local_block_ids: Sequence[int],
        *, notify: bytes = b"", timeout: float, heads: HeadSlice | None = None,
    ) -> TransferResult:
        """``read_blocks`` for an event loop: polls with ``await asyncio.sleep``."""
        pending = self._start("READ", peer, remote_block_ids, local_block_ids, notify, heads)
        return await pending.wait_async(timeout)

    def start_read(
        self, peer: str, remote_block_ids: Sequence[int], local_block_ids: Sequence[int],
        *, notify: bytes = b"", heads: HeadSlice | None = None,
    ) -> PendingTransfer:
        """Posts a READ and returns it, for a caller that polls several at once."""
        return self._start("READ", peer, remote_block_ids, local_block_ids, notify, heads)

    async def write_blocks_async(
        self, peer: str, remote_block_ids: Sequence[int], local_block_ids: Sequence[int],
        *, notify: bytes = b"", timeout: float,
    ) -> TransferResult:
        pending = self._start("WRITE", peer, remote_block_ids, local_block_ids, notify)
        return await pending.wait_async(timeout)

    def transfer_spans(
        self, op: str, peer: str, spans: Sequence[Span], *, notify: bytes = b"", timeout: float
    ) -> TransferResult:
        """Moves arbitrary byte ranges of the two registered caches, one descriptor per span.
        For layouts other than whole blocks (the benchmark's per-layer case); block
        bookkeeping (in-doubt blocks) does not apply."""
        return self._post(op, peer, list(spans), (), notify, time.perf_counter()).wait(timeout)

    def poll_notifications(self) -> list[Notification]:
        """Notifications that arrived since the last call, e.g. "request r was read"."""
        with translate_nixl_errors("reading notifications", self.name):
            new = self._agent.get_new_notifs()
        return [Notification(peer, msg) for peer, msgs in new.items() for msg in msgs]

    def reclaim(self) -> list[int]:
        """Local blocks of given-up READs that can be reused now (each returned once)."""
        for transfer in [t for t in self._given_up if t.settle()]:
            self._given_up.remove(transfer)
            self._settled(transfer)
        blocks, self._reclaimable = self._reclaimable, []
        return blocks

    @property
    def num_blocks_in_doubt(self) -> int:
        return sum(len(t.local_block_ids) for t in self._given_up if t.op == "READ")

    def close(self) -> None:
        """Forgets all peers, deregisters the cache and drops the NIXL agent, whose
        progress thread otherwise keeps polling (a sizeable part of a core, even idle)."""
        if self._nixl is None:
            return
        for peer in list(self._peers):
            try:
                self.remove_peer(peer)
            except KVTransferError:
                logger.warning("removing peer %r on close failed", peer, exc_info=True)
        for transfer in self._given_up:
            transfer.release()
        self._given_up.clear()
        if self._stream is not None:
            self._stream.synchronize()  # no copy may outlive the caches it writes
        self._nixl.deregister_memory(self._scratch_registration)
        self._nixl.deregister_memory(self._registration)
        # The agent (and its threads) is destroyed with its last reference.
        self._nixl = None

    def __enter__(self) -> KVTransferAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------

    @property
    def _agent(self) -> Any:  # nixl._api.nixl_agent
        if self._nixl is None:
            raise KVTransferError(f"agent {self.name!r} is closed")
        return self._nixl

    def _start(
        self, op: str, peer: str, remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int], notify: bytes, heads: HeadSlice | None = None,
    ) -> PendingTransfer:
        started_at = time.perf_counter()
        remote = self._peer(peer).region
        check_block_ids(remote_block_ids, local_block_ids, remote.num_blocks, self.region.num_blocks)
        if not local_block_ids:
            raise InvalidBlocksError("no blocks to transfer")
        runs = coalesce(remote_block_ids, local_block_ids)
        if heads is None:
            if remote.block_bytes != self.region.block_bytes:
                raise InvalidBlocksError(f"peer {peer!r} holds other KV heads than ours: read a HeadSlice")
            spans = runs_to_spans(runs, self.region.block_bytes)
        else:
            peer_layout = self._peer(peer).layout
            if (heads.remote_head + heads.num_heads > peer_layout.num_kv_heads
                    or heads.local_head + heads.num_heads > self.layout.num_kv_heads or heads.num_heads <= 0):
                raise InvalidBlocksError(f"{heads} is outside the {peer_layout.num_kv_heads} and {self.layout.num_kv_heads} heads")
            spans = head_slice_spans(runs, heads, remote.block_bytes, self.region.block_bytes, self.layout.head_bytes)
        return self._post(op, peer, spans, tuple(local_block_ids), notify, started_at)

    def _post(
        self, op: str, peer: str, spans: list[Span], local_block_ids: tuple[int, ...],
        notify: bytes, started_at: float, *, scratch: bool = False,
    ) -> PendingTransfer | IpcCopies:
        """``scratch``: the local side is the probe buffer, not the cache."""
        if op not in ("READ", "WRITE"):
            raise ValueError(f"op must be 'READ' or 'WRITE', got {op!r}")
        known = self._peer(peer)
        remote = known.region
        local = self._scratch_region if scratch else self.region
        if known.path == CUDA_IPC and op == "READ":
            # Checked like NIXL's descriptors: the copy engine would write wherever it is told.
            _check_ranges(local, [(s.local_offset, s.length) for s in spans])
            _check_ranges(remote, [(s.remote_offset, s.length) for s in spans])
            if self._stream is None:
                self._stream = torch.cuda.Stream(self._flat.device)
            return IpcCopies(known.ipc_cache, self._scratch if scratch else self._flat, spans, self._stream, peer=peer,
                             local_block_ids=local_block_ids, started_at=started_at, on_abandon=self._given_up.append)
        local_descs = self._descs(local, [(s.local_offset, s.length) for s in spans])
        remote_descs = self._descs(remote, [(s.remote_offset, s.length) for s in spans])
        with translate_nixl_errors(f"creating {op}", peer):
            handle = self._agent.initialize_xfer(op, local_descs, remote_descs, peer, notify)
        pending = PendingTransfer(
            self._agent, handle, op=op, peer=peer, local_block_ids=local_block_ids,
            num_bytes=sum(s.length for s in spans), num_descriptors=len(spans),
            started_at=started_at, on_abandon=self._given_up.append,
        )
        pending.post()
        return pending

    def _descs(self, region: CacheRegion, ranges: list[tuple[int, int]]) -> object:
        # [num_descriptors, 3]: (address, length, device id), as NIXL takes them.
        rows = _check_ranges(region, ranges)
        table = np.empty((len(rows), 3), dtype=np.uint64)
        table[:, 0] = rows[:, 0] + np.uint64(region.base_addr)
        table[:, 1] = rows[:, 1]
        table[:, 2] = region.device_id
        descs = self._agent.get_xfer_descs(table, region.mem_type)
        if descs is None:  # NIXL returns None, not an error, for input it cannot use
            raise InvalidBlocksError(f"NIXL refused {len(rows)} descriptors")
        return descs

    def _peer(self, peer: str) -> _Peer:
        try:
            return self._peers[peer]
        except KeyError:
            raise UnknownPeerError(f"peer {peer!r} is not known; add_peer() it first") from None

    def _settled(self, transfer: PendingTransfer | IpcCopies) -> None:
        if transfer.op == "READ":
            self._reclaimable.extend(transfer.local_block_ids)


def _export(kv_cache: torch.Tensor) -> cuda_ipc.IpcExport | None:
    try:
        return cuda_ipc.export_cache(kv_cache)
    except RuntimeError as e:  # e.g. memory from an allocator that cannot be shared: NIXL only
        logger.warning("the KV cache cannot be exported for CUDA IPC (%s): same-host peers read it over NIXL", e)
        return None


def _check_ranges(region: CacheRegion, ranges: list[tuple[int, int]]) -> np.ndarray:
    """[num_ranges, 2] (offset, length), once none ends past the region."""
    rows = np.array(ranges, dtype=np.uint64).reshape(-1, 2)
    if rows.size and int((rows[:, 0] + rows[:, 1]).max()) > region.num_bytes:
        raise InvalidBlocksError(f"a span ends past the {region.num_bytes}-byte cache")
    return rows
