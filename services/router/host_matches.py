"""Prefix matches across a worker's two KV tiers, from an index that knows each tier apart.

A worker's GPU blocks are indexed under its id and its host-tier blocks under
``host_index_id(id)``. A prompt's usable prefix on a worker runs through either tier (typically
its head still on the GPU and its tail spilled to the host, since the tail is evicted first),
so the match alternates: the GPU run, then the host run from where it stopped, then the GPU
again, until neither tier holds the next block. Each round is one ``match_prefix`` per
distinct start; most prompts need one round past the GPU's, a few need two.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import NamedTuple

from splitserve.controlplane.types import host_index_id

MAX_ROUNDS = 4  # host, GPU, host, GPU past the first GPU run: enough for any realistic interleaving

Match = Callable[[Sequence[bytes], Sequence[str]], Awaitable[dict[str, int]]]


class TierMatches(NamedTuple):
    num_matched: dict[str, int]  # leading blocks held in either tier
    num_host: dict[str, int]  # how many of those are host-tier blocks (a copy back each)


async def match_tiers(
    match: Match, block_hashes: Sequence[bytes], gpu_matched: Mapping[str, int], host_workers: Collection[str]
) -> TierMatches:
    """Extends ``gpu_matched`` (worker id -> leading GPU blocks) through the host tiers of ``host_workers``."""
    num_matched, num_host = dict(gpu_matched), dict.fromkeys(gpu_matched, 0)
    active = [w for w in gpu_matched if w in host_workers and num_matched[w] < len(block_hashes)]
    on_host = True
    for _ in range(MAX_ROUNDS):
        if not active:
            break
        by_start: dict[int, list[str]] = {}
        for worker_id in active:
            by_start.setdefault(num_matched[worker_id], []).append(worker_id)
        advanced = []
        for start, worker_ids in by_start.items():
            index_ids = [host_index_id(w) if on_host else w for w in worker_ids]
            got = await match(block_hashes[start:], index_ids)
            for worker_id, index_id in zip(worker_ids, index_ids):
                n = got.get(index_id, 0)
                if n:
                    num_matched[worker_id] += n
                    num_host[worker_id] += n if on_host else 0
                    advanced.append(worker_id)
        active = [w for w in advanced if num_matched[w] < len(block_hashes)]
        on_host = not on_host
    return TierMatches(num_matched, num_host)
