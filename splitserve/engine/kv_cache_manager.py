"""Which blocks each request holds, prefix-cache lookups, and allocation for new tokens."""
from __future__ import annotations

from splitserve.engine.block_pool import Block, BlockPool
from splitserve.engine.request import Request


class KVCacheManager:
    """Maps requests to blocks of the paged KV cache.

    The scheduler asks for the blocks a request can reuse (``get_computed_blocks``),
    then for room for the tokens it will compute this step (``allocate_slots``),
    and gives everything back with ``free``. Full blocks are entered into the
    prefix cache only after their KV has been computed (``cache_blocks``), so a
    block whose KV is still on its way from another worker is never a hit.
    """

    def __init__(self, block_pool: BlockPool, block_size: int) -> None:
        self.block_pool = block_pool
        self.block_size = block_size
        self.req_to_blocks: dict[str, list[Block]] = {}
        self._block_ids: dict[str, list[int]] = {}  # the same, as ids: read every step
        self._num_cached_blocks: dict[str, int] = {}  # blocks already entered into the cache
        self.quarantined: dict[int, Block] = {}  # held back from reuse; see free()

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[Block], int]:
        """The longest run of cached blocks matching the request's prefix, and the tokens they hold.

        At least one token is always left to compute, so the request gets logits.
        """
        if not self.block_pool.enable_caching:
            return [], 0
        hashes = request.update_block_hashes(self.block_size)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        for i, block_hash in enumerate(hashes[:max_blocks]):
            tokens = request.all_token_ids[i * self.block_size : (i + 1) * self.block_size]
            block = self.block_pool.get_cached_block(block_hash, tokens)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: list[Block] = ()) -> list[Block] | None:
        """Room for ``num_new_tokens`` more tokens after the computed ones; None if it does not fit.

        ``computed_blocks`` are prefix-cache hits (from ``get_computed_blocks``) that
        the request takes a reference on now.
        """
        held = self.req_to_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_needed = self.num_blocks_for(num_computed + num_new_tokens) - len(held) - len(computed_blocks)
        # Hits sitting in the free queue are about to leave it.
        num_free_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_needed > self.block_pool.num_free_blocks - num_free_hits:
            return None
        self.block_pool.touch(computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(max(num_needed, 0))
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        ids = self._block_ids.setdefault(request.request_id, [])
        ids.extend(b.block_id for b in computed_blocks)
        ids.extend(b.block_id for b in new_blocks)
        blocks.extend(computed_blocks)
        blocks.extend(new_blocks)
        self._num_cached_blocks.setdefault(request.request_id, 0)
        self._num_cached_blocks[request.request_id] += len(computed_blocks)
        return new_blocks

    def cache_blocks(self, request: Request) -> None:
        """Enters the request's full, computed blocks into the prefix cache."""
        blocks = self.req_to_blocks.get(request.request_id)
        if not blocks or not self.block_pool.enable_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        start = self._num_cached_blocks[request.request_id]
        if num_full <= start:
            return
        hashes = request.update_block_hashes(self.block_size)
        for i in range(start, num_full):
            tokens = request.all_token_ids[i * self.block_size : (i + 1) * self.block_size]
            self.block_pool.cache_full_block(blocks[i], hashes[i], tokens)
        self._num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request, quarantine: frozenset[int] = frozenset()) -> None:
        """Gives back every block of the request; safe to call twice.

        Blocks in ``quarantine`` stay referenced until ``free_quarantined``: a KV
        transfer that missed its deadline may still write into them.
        """
        blocks = self.req_to_blocks.pop(request.request_id, None)
        self._block_ids.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if blocks:
            for block in blocks:
                if block.block_id in quarantine:
                    self.quarantined[block.block_id] = block
            # Tail blocks first: they are the least likely to be shared, so evict them first.
            self.block_pool.free_blocks(b for b in reversed(blocks) if b.block_id not in quarantine)

    def trim(self, request: Request, num_tokens: int) -> None:
        """Gives back the blocks past the first ``num_tokens`` tokens' (the slots of proposed
        tokens that were rejected). Only blocks past the computed tokens may go: the cached
        ones hold KV that stays valid."""
        blocks = self.req_to_blocks.get(request.request_id)
        keep = self.num_blocks_for(num_tokens)
        if not blocks or keep >= len(blocks):
            return
        if keep < self._num_cached_blocks[request.request_id] or num_tokens < request.num_computed_tokens:
            raise ValueError(f"trimming {request.request_id!r} to {num_tokens} tokens would drop computed KV")
        extra = blocks[keep:]
        del blocks[keep:]
        del self._block_ids[request.request_id][keep:]
        self.block_pool.free_blocks(reversed(extra))

    def free_quarantined(self, block_ids: list[int]) -> None:
        self.block_pool.free_blocks(self.quarantined.pop(i) for i in block_ids if i in self.quarantined)

    def get_block_ids(self, request_id: str) -> list[int]:
        return list(self._block_ids.get(request_id, ()))

    @property
    def num_requests(self) -> int:
        return len(self.req_to_blocks)
