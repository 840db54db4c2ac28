"""The routing policies on hand-made snapshots: no I/O, no clocks."""
from __future__ import annotations

import collections

import pytest
from hypothesis import given
from hypothesis import strategies as st

from splitserve.controlplane import LiveWorker, WorkerInfo, WorkerLoad
from splitserve.engine.prefix_hash import hash_request_tokens
from splitserve.services.router.routing import (
    CostWeights,
    LeastLoadedPolicy,
    NoWorkerAvailable,
    PrefixAwarePolicy,
    RoundRobinPolicy,
    make_policy,
    should_skip_prefill,
)

BLOCK_SIZE = 16


def worker(worker_id: str, role: str = "prefill", **load: int) -> LiveWorker:
    load.setdefault("num_total_blocks", max(100, load.get("num_free_blocks", 0)))
    return LiveWorker(WorkerInfo(worker_id, role, f"{worker_id}:50051", BLOCK_SIZE), WorkerLoad(**load))


def prompt(seed: int, num_blocks: int = 128) -> list[bytes]:  # 128 blocks: a 2k-token prompt
    return hash_request_tokens([seed * 1_000_000 + i for i in range(num_blocks * BLOCK_SIZE)], BLOCK_SIZE)


def test_prefix_aware_prefers_the_worker_holding_the_prefix():
    hashes = prompt(1)
    candidates = [worker("a"), worker("b"), worker("c")]
    decision = PrefixAwarePolicy().pick_prefill(hashes, candidates, {"a": 0, "b": 100, "c": 20})
    assert (decision.worker_id, decision.address, decision.policy) == ("b", "b:50051", "prefix_aware")
    assert (decision.reason, decision.num_cached_tokens) == ("prefix_hit", 100 * BLOCK_SIZE)
    assert decision.cost == (128 - 100) * BLOCK_SIZE


def test_a_somewhat_busier_holder_still_wins_a_much_busier_one_does_not():
    hashes = prompt(2)  # 2048 tokens; "b" holds 1600 of them
    matches = {"a": 0, "b": 100}
    busy = PrefixAwarePolicy().pick_prefill(hashes, [worker("a"), worker("b", num_tokens_in_flight=1000, num_running=2)], matches)
    assert (busy.worker_id, busy.reason) == ("b", "prefix_hit")

    swamped = PrefixAwarePolicy().pick_prefill(hashes, [worker("a"), worker("b", num_tokens_in_flight=4000, num_waiting=8)], matches)
    assert (swamped.worker_id, swamped.reason, swamped.num_cached_tokens) == ("a", "load_over_prefix", 0)


def test_load_weight_trades_cache_against_queue():
    hashes = prompt(3)
    candidates = [worker("a"), worker("b", num_tokens_in_flight=3000)]
    matches = {"a": 0, "b": 100}  # b: 448 tokens to compute behind 3000; a: 2048 behind nothing
    assert PrefixAwarePolicy(CostWeights(load_weight=1.0)).pick_prefill(hashes, candidates, matches).worker_id == "a"
    assert PrefixAwarePolicy(CostWeights(load_weight=0.5)).pick_prefill(hashes, candidates, matches).worker_id == "b"


def test_without_the_index_the_policy_routes_by_load_only():
    hashes = prompt(4)
    candidates = [worker("a", num_waiting=4), worker("b", num_running=1), worker("c", num_tokens_in_flight=500)]
    decision = PrefixAwarePolicy().pick_prefill(hashes, candidates, None)
    assert (decision.worker_id, decision.reason, decision.num_cached_tokens) == ("b", "load_only", 0)


def test_least_loaded_ignores_prefixes_and_spreads_a_stream_of_requests():
    policy = LeastLoadedPolicy()
    assert policy.pick_prefill(prompt(5), [worker("a", num_running=1), worker("b")], {"a": 128, "b": 0}).worker_id == "b"

    # Each request adds its tokens to the chosen worker's queue: the queues stay level.
    queued = {"a": 0, "b": 0, "c": 0, "d": 0}
    for seed in range(40):
        candidates = [worker(w, num_tokens_in_flight=n) for w, n in queued.items()]
        decision = policy.pick_prefill(prompt(seed, 64), candidates, {})
        assert decision.reason == "least_loaded"
        queued[decision.worker_id] += 64 * BLOCK_SIZE
    assert set(queued.values()) == {10 * 64 * BLOCK_SIZE}


def test_ties_break_the_same_way_whatever_the_order_and_spread_over_workers():
    candidates = [worker(w) for w in ("a", "b", "c", "d")]
    winners = collections.Counter()
    for seed in range(200):
        hashes = prompt(seed, 4)
        first = PrefixAwarePolicy().pick_prefill(hashes, candidates, {})
        again = PrefixAwarePolicy().pick_prefill(hashes, list(reversed(candidates)), {})
        assert first == again
        winners[first.worker_id] += 1
    assert set(winners) == {"a", "b", "c", "d"} and min(winners.values()) > 20


@given(
    loads=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 4000)), min_size=1, max_size=6),
    matched=st.lists(st.integers(0, 32), min_size=6, max_size=6),
    seed=st.integers(0, 1000),
)
def test_a_decision_depends_on_the_view_not_on_candidate_order(loads, matched, seed):
    candidates = [worker(f"w{i}", num_waiting=w, num_running=r, num_tokens_in_flight=t) for i, (w, r, t) in enumerate(loads)]
    matches = {c.info.worker_id: m for c, m in zip(candidates, matched)}
    hashes = prompt(seed, 32)
    policy = PrefixAwarePolicy()
    assert policy.pick_prefill(hashes, candidates, matches) == policy.pick_prefill(hashes, candidates[::-1], matches)


def test_decode_goes_where_the_request_fits_with_the_most_room():
    candidates = [
        worker("a", "decode", num_free_blocks=10, num_total_blocks=100),
        worker("b", "decode", num_free_blocks=80, num_total_blocks=100, num_running=4),
        worker("c", "decode", num_free_blocks=60, num_total_blocks=100),
    ]
    decision = PrefixAwarePolicy().pick_decode(candidates, num_blocks_needed=20)
    assert (decision.worker_id, decision.reason) == ("b", "fits")
    # Too many running requests outweigh a little more free KV.
    crowded = [worker("b", "decode", num_free_blocks=80, num_running=40), candidates[2]]
    assert PrefixAwarePolicy().pick_decode(crowded, num_blocks_needed=20).worker_id == "c"
    # A worker that cannot hold the request loses to one that can, however idle.
    assert PrefixAwarePolicy().pick_decode(candidates, num_blocks_needed=70).worker_id == "b"
    assert PrefixAwarePolicy().pick_decode(candidates[::2], num_blocks_needed=70).reason == "no_capacity"


def test_decode_ties_follow_the_tie_key():
    candidates = [worker(w, "decode", num_free_blocks=50) for w in ("a", "b", "c")]
    picks = {PrefixAwarePolicy().pick_decode(candidates, 4, tie_key=f"req-{i}".encode()).worker_id for i in range(30)}
    assert picks == {"a", "b", "c"}
    assert PrefixAwarePolicy().pick_decode(candidates, 4, b"k") == PrefixAwarePolicy().pick_decode(candidates[::-1], 4, b"k")


def test_round_robin_takes_turns_in_worker_id_order():
    policy = RoundRobinPolicy()
    candidates = [worker("c"), worker("a"), worker("b")]
    picks = [policy.pick_prefill(prompt(0, 2), candidates, {"a": 2}).worker_id for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    assert policy.pick_prefill(prompt(0, 2), candidates, {"a": 2}).num_cached_tokens == 2 * BLOCK_SIZE
    decodes = [worker("y", "decode"), worker("x", "decode")]
    assert [policy.pick_decode(decodes, 1).worker_id for _ in range(3)] == ["x", "y", "x"]


def test_short_prompts_skip_the_prefill_worker():
    assert should_skip_prefill(num_prompt_tokens=100, threshold=256)
    assert not should_skip_prefill(num_prompt_tokens=300, threshold=256)
    assert should_skip_prefill(num_prompt_tokens=1000, threshold=256, num_cached_tokens=800)
    assert not should_skip_prefill(num_prompt_tokens=1, threshold=0)  # off


def test_policies_by_name_and_empty_pools():
    assert [make_policy(n).name for n in ("prefix_aware", "least_loaded", "round_robin")] == [
        "prefix_aware",
        "least_loaded",
        "round_robin",
    ]
    with pytest.raises(ValueError, match="routing policy"):
        make_policy("random")
    with pytest.raises(NoWorkerAvailable, match="prefill"):
        PrefixAwarePolicy().pick_prefill(prompt(0, 1), [], {})
    with pytest.raises(NoWorkerAvailable, match="decode"):
        RoundRobinPolicy().pick_decode([], 1)
