"""The pool of KV blocks: reference counts, a free queue with O(1) removal, and the prefix cache.

A block is in exactly one of three states:
- in use: ``ref_cnt > 0``; not in the free queue;
- free and cached: ``ref_cnt == 0``, has a hash, in the free queue (evictable, LRU first);
- free and empty: ``ref_cnt == 0``, no hash, in the free queue.
Blocks freed by a request go to the queue's tail, so the least recently used
cached block is evicted first when new blocks are needed.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from splitserve.engine.prefix_hash import BlockHash


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.token_ids: tuple[int, ...] = ()  # kept with the hash to confirm a cache hit
        self.prev_free: Block | None = None
        self.next_free: Block | None = None

    def __repr__(self) -> str:
        return f"Block(id={self.block_id}, ref_cnt={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeBlockQueue:
    """A doubly linked list of free blocks: pop from the head, append and remove anywhere in O(1)."""

    def __init__(self, blocks: Sequence[Block]) -> None:
        self._head = Block(-1)  # sentinels; never handed out
        self._tail = Block(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def append(self, block: Block) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.num_free_blocks += 1

    def remove(self, block: Block) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise RuntimeError(f"{block!r} is not in the free queue")
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def popleft(self) -> Block:
        first = self._head.next_free
        if first is None or first is self._tail:
            raise RuntimeError("no free blocks")
        self.remove(first)
        return first


class BlockPool:
    """Hands out blocks, takes them back, and keeps full blocks findable by hash."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, Block] = {}
        self.num_evictions = 0
        # Called with (block_id, block_hash, token_ids) when a cached block is reused for new
        # content (the host KV tier keeps a copy); not when the prefix cache is reset.
        self.on_evict: Callable[[int, BlockHash, tuple[int, ...]], None] | None = None
        # Recorded for the control plane only when a worker asks for them.
        self.record_kv_events = False
        self.kv_events: list[tuple[str, BlockHash]] = []

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free_blocks

    def get_new_blocks(self, num_blocks: int) -> list[Block]:
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        blocks = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def get_cached_block(self, block_hash: BlockHash, token_ids: Sequence[int]) -> Block | None:
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None  # a 128-bit collision is not a hit
        return block

    def touch(self, blocks: Iterable[Block]) -> None:
        """Takes a reference on cached blocks, pulling free ones out of the eviction queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[Block]) -> None:
        """Drops one reference each; give them in eviction order (first evicted first)."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block!r}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_full_block(self, block: Block, block_hash: BlockHash, token_ids: Sequence[int]) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return  # another block already holds this content; this one stays private
        block.block_hash, block.token_ids = block_hash, tuple(token_ids)
        self.cached[block_hash] = block
        if self.record_kv_events:
            self.kv_events.append(("stored", block_hash))

    def reset_prefix_cache(self) -> list[BlockHash]:
        """Forgets every cached block not in use; returns the hashes removed."""
        removed = [h for h, b in self.cached.items() if b.ref_cnt == 0]
        for block_hash in removed:
            self._evict(self.cached[block_hash], reuse=False)
        return removed

    def _evict(self, block: Block, reuse: bool = True) -> None:
        if block.block_hash is None:
            return
        if reuse and self.on_evict is not None:
            self.on_evict(block.block_id, block.block_hash, block.token_ids)
        del self.cached[block.block_hash]
        if self.record_kv_events:
            self.kv_events.append(("removed", block.block_hash))
        block.block_hash, block.token_ids = None, ()
        self.num_evictions += 1

    def drain_kv_events(self) -> list[tuple[str, BlockHash]]:
        """("stored" | "removed", block_hash) in the order they happened, since the last drain."""
        events, self.kv_events = self.kv_events, []
        return events
