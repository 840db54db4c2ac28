"""Prefix lookups over both KV tiers: the GPU block pool first, the host tier behind it."""
from __future__ import annotations

from splitserve.engine.block_pool import Block, BlockPool
from splitserve.engine.host_tier import HostKVTier
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.request import Request


class TieredKVCacheManager(KVCacheManager):
    """A KVCacheManager whose evicted prefix blocks spill to a host tier and come back as hits.

    ``get_computed_blocks`` follows the prompt's blocks through either tier: a block found
    only on the host gets a GPU block now, enters the GPU prefix cache, and its copy is queued
    (``HostKVTier.flush`` issues it before the next step). Such a block is a hit like any
    other, so the scheduler needs no special case; if the request is not admitted after all,
    the restored blocks stay cached on the GPU, free, for whoever asks next.
    """

    def __init__(self, block_pool: BlockPool, block_size: int, host_tier: HostKVTier) -> None:
        super().__init__(block_pool, block_size)
        self.host_tier = host_tier
        block_pool.on_evict = host_tier.spill

    def get_computed_blocks(self, request: Request) -> tuple[list[Block], int]:
        if not self.block_pool.enable_caching:
            return [], 0
        pool, bs = self.block_pool, self.block_size
        hashes = request.update_block_hashes(bs)
        max_blocks = (request.num_tokens - 1) // bs
        hits: list[Block] = []
        try:
            for i, block_hash in enumerate(hashes[:max_blocks]):
                tokens = request.all_token_ids[i * bs : (i + 1) * bs]
                block = pool.get_cached_block(block_hash, tokens)
                if block is not None:
                    # Held while the lookup goes on, so that a block taken for a restore never evicts it.
                    pool.touch([block])
                    hits.append(block)
                    continue
                if self.host_tier.lookup(block_hash, tokens) is None or pool.num_free_blocks == 0:
                    break
                self.host_tier.keep = block_hash  # the spill this allocation may cause must not evict it
                try:
                    (block,) = pool.get_new_blocks(1)  # evicts (and spills) the least recently used free block
                finally:
                    self.host_tier.keep = None
                self.host_tier.restore(block_hash, block.block_id)
                pool.cache_full_block(block, block_hash, tokens)
                hits.append(block)
        finally:
            pool.free_blocks(reversed(hits))  # back to the free queue, tail blocks first to go
        return hits, len(hits) * bs
