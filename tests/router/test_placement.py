"""Per-request placement on constructed worker states, priced with an 8B-on-H200-like step
model (4.6 ms per step for the weights, 26 us per prefill token, 33 ns per KV token read)."""
from __future__ import annotations

import pytest

from splitserve.controlplane.types import LiveWorker, WorkerInfo, WorkerLoad
from splitserve.profile.schema import ModelShape, Profile
from splitserve.profile.step_model import StepModel, TransferModel
from splitserve.services.router.placement import EngineBudget, PlacementPolicy, PlacementSLO, PlacementState

STEP = StepModel(weight_ms=4.6, seq_ms=0.0063, kv_ms_per_token=3.25e-5, compute_base_ms=0.0, token_ms=0.026, pair_ms=9.8e-7)
PROFILE = Profile(
    source="derived", device="test", model=ModelShape("llama-3.1-8b", 32, 8, 128, "bfloat16", 131072), tp_size=1,
    block_size=16, transport="test", prefill=(), decode=(), transfer=(), step_model=STEP,
    transfer_model=TransferModel(0.07, 360.0),
)
SLO = PlacementSLO(ttft_ms=500.0, itl_ms=50.0)
TOTAL_BLOCKS = 40_000


def worker(role: str, *, waiting=0, running=0, queued_tokens=0, context_tokens=0) -> LiveWorker:
    used = context_tokens // 16
    return LiveWorker(WorkerInfo(f"{role}-0", role, "127.0.0.1:1", 16),
                      WorkerLoad(waiting, running, queued_tokens, TOTAL_BLOCKS - used, TOTAL_BLOCKS))


def policy(budget: int = 8192) -> PlacementPolicy:
    return PlacementPolicy(PROFILE, PROFILE, SLO, EngineBudget(budget), EngineBudget(budget))


def test_long_prompt_with_decode_idle_is_prefilled_locally():
    # Same prefill time on either side; remote adds the KV transfer before the second token.
    state = PlacementState(6000, worker("prefill"), worker("decode"))
    decision = policy().decide(state)
    assert decision.where == "local"
    assert decision.local.ttft_ms == pytest.approx(decision.remote.ttft_ms)
    assert decision.reason == "itl"


def test_long_prompt_goes_local_when_the_prefill_worker_is_backed_up():
    state = PlacementState(3000, worker("prefill", waiting=6, queued_tokens=20_000), worker("decode"))
    decision = policy().decide(state)
    assert decision.remote.ttft_ms > SLO.ttft_ms > decision.local.ttft_ms
    assert (decision.where, decision.reason) == ("local", "ttft")


def test_burst_of_long_prompts_with_busy_decode_goes_remote():
    # 200 running requests: a 3k-token prompt in their steps stalls each of them ~90 ms.
    busy = worker("decode", running=200, queued_tokens=6000, context_tokens=200 * 1500)
    state = PlacementState(3000, worker("prefill", waiting=2, queued_tokens=6000), busy)
    decision = policy().decide(state)
    assert decision.local.itl_ms > SLO.itl_ms > decision.remote.itl_ms
    assert (decision.where, decision.reason) == ("remote", "itl")


def test_a_stall_of_the_running_batch_counts_against_a_ttft_miss():
    # Four running requests would see one 80 ms step (ITL headroom -0.6); remote misses TTFT by
    # less (headroom about -0.2): relative headroom sends it remote.
    state = PlacementState(3000, worker("prefill", waiting=6, queued_tokens=20_000), worker("decode", running=4, context_tokens=4000))
    decision = policy().decide(state)
    assert decision.local.itl_ms > 1.5 * SLO.itl_ms and SLO.ttft_ms < decision.remote.ttft_ms < 1.5 * SLO.ttft_ms
    assert (decision.where, decision.reason) == ("remote", "itl")


def test_short_prompt_beside_a_running_batch_stays_local():
    # 64 tokens in a step of 100 rows cost ~2 ms more: cheaper than queueing behind 30k tokens.
    state = PlacementState(64, worker("prefill", waiting=10, queued_tokens=30_000), worker("decode", running=100, context_tokens=100 * 800))
    assert policy().decide(state).where == "local"


def test_no_prefill_worker_means_local():
    decision = policy().decide(PlacementState(3000, None, worker("decode", running=200, context_tokens=200 * 1500)))
    assert (decision.where, decision.reason, decision.remote) == ("local", "no_prefill_worker", None)


def test_local_chunks_follow_the_decode_workers_budget():
    # 8,000 tokens beside 92 rows in a budget of 2,048: chunks of 1,956 -> 5 steps; ITL = the largest.
    decode = worker("decode", running=92, context_tokens=92 * 1000)
    estimate = policy(budget=2048).estimate_local(PlacementState(8000, worker("prefill"), decode))
    one_chunk = STEP.step_ms(92 + 1956, 93, 92 * 1000 + 1956, 1956 * 1957 // 2)
    assert estimate.ttft_ms > 4 * one_chunk
    assert estimate.itl_ms >= one_chunk


def test_slos_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        PlacementSLO(0.0, 50.0)
