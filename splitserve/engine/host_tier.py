"""The host-memory KV tier under the GPU block pool.

A prefix block the GPU pool evicts is copied ("spilled") into a host slot instead of being
lost; a later prompt that misses on the GPU but hits here gets a GPU block back with the host
copy restored into it, and counts as a prefix hit. The tier is a second, larger and slower LRU
cache of the same blocks, keyed by the same block hashes.

Copies are recorded in the order the pool's bookkeeping makes them and issued in that order on
one stream (``flush``) just before the step that needs them, so every ordering problem is
sequential: a spill of GPU block B followed by a restore into B reads B first; a restore from
slot S followed by a spill into S reads S first. On CUDA the stream is a side stream (after the
work already queued, before the step's compute), and the host blocks are pinned.

Host slot states: free (in ``_free_slots``) or holding exactly one block hash (in ``_slots``,
LRU first). Nothing here holds a reference on a GPU block.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch

from splitserve.config import CacheConfig, ConfigError
from splitserve.engine.prefix_hash import BlockHash


class HostSlot(NamedTuple):
    slot_id: int
    token_ids: tuple[int, ...]  # kept with the hash to confirm a hit


class BlockCopy(NamedTuple):
    to_host: bool  # True: GPU block -> host slot (spill); False: host slot -> GPU block (restore)
    gpu_block_id: int
    slot_id: int


class HostKVTier:
    """``num_blocks`` host slots of ``block_shape`` each; hands out spills and restores as copies."""

    def __init__(self, num_blocks: int, block_shape: Sequence[int], dtype: torch.dtype, pin_memory: bool = False) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the host KV tier needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        # [num_blocks, *block_shape]: the GPU cache's block layout, so one block is one contiguous copy.
        self.kv = torch.empty((num_blocks, *block_shape), dtype=dtype, pin_memory=pin_memory)
        self._slots: OrderedDict[BlockHash, HostSlot] = OrderedDict()  # least recently used first
        self._free_slots = list(range(num_blocks - 1, -1, -1))
        self._copies: list[BlockCopy] = []
        self._stream: torch.cuda.Stream | None = None
        self.keep: BlockHash | None = None  # set while a restore takes its GPU block: never evicted then
        self.record_kv_events = False
        self.kv_events: list[tuple[str, BlockHash]] = []
        self.num_spilled_blocks = 0
        self.num_restored_blocks = 0
        self.num_evicted_blocks = 0

    @property
    def num_cached_blocks(self) -> int:
        return len(self._slots)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def cached_hashes(self) -> list[BlockHash]:
        return list(self._slots)

    def contains(self, block_hash: BlockHash) -> bool:
        return block_hash in self._slots

    # -- bookkeeping (the engine thread, while scheduling) ---------------------

    def spill(self, gpu_block_id: int, block_hash: BlockHash, token_ids: tuple[int, ...]) -> None:
        """The GPU pool is reusing ``gpu_block_id``, which held ``block_hash``: keep a host copy."""
        slot = self._slots.get(block_hash)
        if slot is not None:
            self._slots.move_to_end(block_hash)  # already here (restored from this tier earlier)
            return
        if not self._free_slots:
            # The least recently used block goes, unless a restore is about to read it.
            old_hash = next((hb for hb in self._slots if hb != self.keep), None)
            if old_hash is None:
                return  # the one slot is being read from: this block is not kept
            self._free_slots.append(self._slots.pop(old_hash).slot_id)
            self.num_evicted_blocks += 1
            self._event("removed", old_hash)
        slot_id = self._free_slots.pop()
        self._slots[block_hash] = HostSlot(slot_id, tuple(token_ids))
        self._record(BlockCopy(True, gpu_block_id, slot_id))
        self.num_spilled_blocks += 1
        self._event("stored", block_hash)

    def lookup(self, block_hash: BlockHash, token_ids: Sequence[int]) -> HostSlot | None:
        slot = self._slots.get(block_hash)
        if slot is None or slot.token_ids != tuple(token_ids):
            return None  # a 128-bit collision is not a hit
        return slot

    def restore(self, block_hash: BlockHash, gpu_block_id: int) -> None:
        """Copies the host block of ``block_hash`` into ``gpu_block_id`` (before the next step).
        The host copy stays: the block is likely to be evicted again, and then costs no copy."""
        slot = self._slots[block_hash]
        self._slots.move_to_end(block_hash)
        self._record(BlockCopy(False, gpu_block_id, slot.slot_id))
        self.num_restored_blocks += 1

    def clear(self) -> list[BlockHash]:
        """Forgets every host block (their data is not needed by any recorded copy after this)."""
        removed = list(self._slots)
        for block_hash in removed:
            self._free_slots.append(self._slots.pop(block_hash).slot_id)
            self._event("removed", block_hash)
        return removed

    def _record(self, copy: BlockCopy) -> None:
        self._copies.append(copy)

    def drain_kv_events(self) -> list[tuple[str, BlockHash]]:
        events, self.kv_events = self.kv_events, []
        return events

    def _event(self, kind: str, block_hash: BlockHash) -> None:
        if self.record_kv_events:
            self.kv_events.append((kind, block_hash))

    # -- data movement (the engine thread, before the step runs) -----------------

    @property
    def num_pending_copies(self) -> int:
        return len(self._copies)

    def flush(self, kv_cache: torch.Tensor) -> int:
        """Issues the recorded copies against ``kv_cache`` ([num_gpu_blocks, *block_shape]) in
        order; returns how many. On CUDA they run on a side stream that starts after the work
        already queued, and the current stream waits for them, so the next step sees them done
        while the host goes on scheduling."""
        copies, self._copies = self._copies, []
        if not copies:
            return 0
        if kv_cache.device.type != "cuda":
            self._copy(kv_cache, copies, non_blocking=False)
            return len(copies)
        if self._stream is None:
            self._stream = torch.cuda.Stream(kv_cache.device)
        current = torch.cuda.current_stream(kv_cache.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            self._copy(kv_cache, copies, non_blocking=True)
        current.wait_stream(self._stream)
        return len(copies)

    def _copy(self, kv_cache: torch.Tensor, copies: list[BlockCopy], non_blocking: bool) -> None:
        # One copy per block: each block is contiguous on both sides (block-major layout).
        for c in copies:
            if c.to_host:
                self.kv[c.slot_id].copy_(kv_cache[c.gpu_block_id], non_blocking=non_blocking)
            else:
                kv_cache[c.gpu_block_id].copy_(self.kv[c.slot_id], non_blocking=non_blocking)


def make_host_tier(cache: CacheConfig, runner, tp_size: int = 1) -> HostKVTier | None:
    """The tier ``cache.host_kv_cache_bytes`` asks for, shaped like ``runner``'s KV cache; None if none."""
    if cache.host_kv_cache_bytes is None:
        return None
    if tp_size > 1:  # the other ranks' caches live in their own processes: their copies would be missing
        raise ConfigError("host_kv_cache_bytes needs a tensor parallel size of 1")
    kv_cache = runner.kv_cache
    if not cache.enable_prefix_caching:
        raise ConfigError("host_kv_cache_bytes needs prefix caching")
    block_bytes = kv_cache[0].numel() * kv_cache.element_size()
    num_blocks = cache.host_kv_cache_bytes // block_bytes
    if num_blocks < 1:
        raise ConfigError(f"host_kv_cache_bytes {cache.host_kv_cache_bytes} holds no KV block of {block_bytes} bytes")
    return HostKVTier(num_blocks, kv_cache.shape[1:], kv_cache.dtype, pin_memory=kv_cache.device.type == "cuda")
