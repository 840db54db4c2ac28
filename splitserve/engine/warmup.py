"""Warm-up before a GPU worker serves: every Triton kernel variant a step can need is compiled
and every decode CUDA graph up to the batch limit is captured, so no live request waits behind
a compile or a capture (on an H100 they took a third of a worker's time in the first seconds of
a serving run). Steps run on scratch blocks before any is allocated; nothing they write is read.

Triton specializes integer arguments on being 1 and on divisibility by 16, so prefill runs with
1, 16 and 17 tokens (and requests), with and without context before them, and with no row
sampled (a chunk that does not reach the end of its prompt)."""
from __future__ import annotations

import logging
import time

from splitserve.engine.scheduler import ScheduledRequest, SchedulerOutput

log = logging.getLogger(__name__)

SCRATCH_TOKENS = 64  # the longest context a warm-up request reaches


def warm_up(runner, max_num_seqs: int, capture_graphs: bool = True) -> float:
    """Runs the warm-up steps through ``runner.execute`` (every TP rank takes part) before the
    engine allocates any block; returns the seconds it took. Workers call it on CUDA only: the
    CPU path compiles nothing and has no graphs. ``capture_graphs=False`` leaves each decode graph
    to be captured the first time a batch of its size runs (a faster start; those first steps wait)."""
    local = getattr(runner, "local", runner)  # a TP group's rank 0
    start = time.perf_counter()
    runner.bind_thread()
    blocks = list(range(-(-SCRATCH_TOKENS // local.block_size)))
    if runner.num_blocks < len(blocks):
        log.warning("warm-up skipped: %d KV blocks are fewer than its %d scratch blocks", runner.num_blocks, len(blocks))
        return 0.0

    def step(*requests: tuple[int, int, bool]) -> None:  # (tokens, context before them, sample)
        runner.execute(SchedulerOutput([
            ScheduledRequest(f"warm-up-{i}", [3] * n, start, blocks, sample) for i, (n, start, sample) in enumerate(requests)
        ]))

    for n in (1, 16, 17):
        step((n, 0, True))
        step((n, 17, True))
    step((16, 0, False))
    step(*[(1, 16, True)] * 16, (17, 0, True))  # a mixed step: 16 decodes and a prefill
    step(*[(2, 0, True)] * 17)
    graphs = local.graphs if capture_graphs else None
    if graphs is not None:
        for batch in (b for b in graphs.buckets if b <= max_num_seqs):
            step(*[(1, 17, True)] * batch)  # captured on every rank the first time, then replayed
    seconds = time.perf_counter() - start
    log.info("warm-up: kernels compiled and decode graphs captured in %.1f s", seconds)
    return seconds
