"""Mixed-role decode workers (--accept-prefill) in placement: they take prefill work for
other decode workers only while their own batch leaves room. Same 8B-on-H200-like step model
as test_placement.py."""
from __future__ import annotations

from splitserve.controlplane.types import LiveWorker, WorkerInfo, WorkerLoad
from splitserve.services.router.placement import PlacementState
from test_placement import SLO, TOTAL_BLOCKS, policy, worker


def mixed(worker_id: str = "decode-1", *, running=0, waiting=0, queued_tokens=0, context_tokens=0, free_blocks=None) -> LiveWorker:
    free = TOTAL_BLOCKS - context_tokens // 16 if free_blocks is None else free_blocks
    return LiveWorker(WorkerInfo(worker_id, "decode", "127.0.0.1:2", 16, accepts_prefill=True),
                      WorkerLoad(waiting, running, queued_tokens, free, TOTAL_BLOCKS))


def test_idle_mixed_worker_has_headroom_for_a_long_prompt():
    assert policy().has_headroom(mixed(), 3000)


def test_mixed_worker_with_a_large_batch_takes_no_prefill():
    # 200 running requests: a 3k-token prompt in their steps makes each of their gaps ~90 ms > 50.
    busy = mixed(running=200, context_tokens=200 * 1500)
    assert policy().estimate_local(PlacementState(3000, None, busy)).itl_ms > SLO.itl_ms
    assert not policy().has_headroom(busy, 3000)
    # A short prompt still fits beside the same batch.
    assert policy().has_headroom(busy, 64)


def test_mixed_worker_with_a_backed_up_queue_takes_no_prefill():
    assert not policy().has_headroom(mixed(waiting=8, queued_tokens=40_000), 3000)


def test_mixed_worker_without_free_blocks_takes_no_prefill():
    assert not policy().has_headroom(mixed(free_blocks=100), 3000)  # 3,001 tokens need 188 blocks
    assert policy().has_headroom(mixed(free_blocks=188), 3000)


def test_a_plain_decode_worker_never_takes_prefill():
    assert not policy().has_headroom(worker("decode"), 64)


def test_busy_decode_worker_sends_the_prompt_to_an_idle_mixed_worker():
    busy = worker("decode", running=200, queued_tokens=6000, context_tokens=200 * 1500)
    decision = policy().decide(PlacementState(3000, mixed(), busy))
    assert decision.local.itl_ms > SLO.itl_ms > decision.remote.itl_ms
    assert (decision.where, decision.reason) == ("mixed", "itl")


def test_mixed_worker_ttft_counts_its_own_batch():
    # Its prompt chunks share steps with its 100 running rows: slower than on an idle prefill worker.
    p = policy()
    own = mixed(running=100, context_tokens=100 * 1000)
    busy = worker("decode", running=200, context_tokens=200 * 1500)
    on_mixed = p.estimate_remote(PlacementState(3000, own, busy)).ttft_ms
    on_prefill = p.estimate_remote(PlacementState(3000, worker("prefill"), busy)).ttft_ms
    assert on_mixed == p.estimate_local(PlacementState(3000, None, own)).ttft_ms
    assert on_mixed > on_prefill
