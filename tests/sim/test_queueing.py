"""The simulator against queueing cases computed by hand: exact times, not tolerances."""
from __future__ import annotations

from dataclasses import replace

import pytest

from splitserve.bench.metrics import compute_metrics, ttft
from splitserve.profile.step_model import StepModel, TransferModel
from splitserve.sim.cluster import Layout, Overheads, Simulator
from splitserve.sim.worker import EngineLimits
from splitserve.sim.workload import SimRequest
from sim_profiles import constant, make_profile


def colocated(step: StepModel, engines: int = 1, **limits) -> Layout:
    limits.setdefault("async_scheduling", False)
    return Layout(0, engines, None, make_profile(step), EngineLimits(**limits))


def run(layout: Layout, requests: list[SimRequest]):
    return Simulator(layout, view=None).run(requests)


def test_dd1_queue_builds_up_exactly():
    # Arrivals every 10 ms, service 15 ms, one at a time: request k finishes at 15(k+1),
    # so its TTFT is 15(k+1) - 10k = 15 + 5k ms.
    requests = [SimRequest(k, 0.010 * k, 32, 1) for k in range(10)]
    result = run(colocated(constant(15.0), max_num_seqs=1), requests)
    assert [round(ttft(r) * 1e3, 9) for r in result.records] == [15 + 5 * k for k in range(10)]
    assert result.duration_s == pytest.approx(0.150, abs=1e-12)
    # Goodput at TTFT <= 40 ms: k <= 5 meet it, 6 requests over 150 ms.
    metrics = compute_metrics(result.records, result.duration_s, slos_ms={"ttft": 40.0})
    assert metrics.request_goodput == pytest.approx(6 / 0.150)


def test_dd1_under_capacity_never_queues():
    requests = [SimRequest(k, 0.010 * k, 32, 1) for k in range(10)]
    result = run(colocated(constant(4.0), max_num_seqs=1), requests)
    assert {round(ttft(r) * 1e3, 9) for r in result.records} == {4.0}


def test_two_requests_arriving_together_share_a_step():
    # Compute-bound steps of 0.01 ms per token, 1 ms floor: 200 tokens in one step = 2 ms.
    step = StepModel(1.0, 0.0, 0.0, 0.0, 0.01, 0.0)
    requests = [SimRequest(0, 0.0, 100, 1), SimRequest(1, 0.0, 100, 1)]
    result = run(colocated(step), requests)
    assert [round(ttft(r) * 1e3, 9) for r in result.records] == [2.0, 2.0]


def test_two_requests_split_by_the_token_budget():
    # Budget 150: step 1 = A's 100 tokens + B's first 50 (1.5 ms); step 2 = B's last 50,
    # priced at the 1 ms floor. A: 1.5 ms, B: 2.5 ms.
    step = StepModel(1.0, 0.0, 0.0, 0.0, 0.01, 0.0)
    requests = [SimRequest(0, 0.0, 100, 1), SimRequest(1, 0.0, 100, 1)]
    result = run(colocated(step, max_num_batched_tokens=150), requests)
    assert [round(ttft(r) * 1e3, 9) for r in result.records] == [1.5, 2.5]


def test_chunked_prefill_arithmetic():
    # 1000 tokens in chunks of 256, 256, 256, 232: 4 steps x 1 ms + 1000 x 0.01 ms + every
    # causal pair once (1000 * 1001 / 2 pairs x 1e-5 ms), whatever the chunking.
    step = StepModel(0.0, 0.0, 0.0, 1.0, 0.01, 1e-5)
    result = run(colocated(step, max_num_batched_tokens=256), [SimRequest(0, 0.0, 1000, 1)])
    assert ttft(result.records[0]) * 1e3 == pytest.approx(4 + 10 + 500500 * 1e-5, abs=1e-9)
    assert result.steps == {"decode-0": 4}


def test_decode_steps_stream_one_token_each():
    # 3 output tokens at 2 ms a step: 2, 4, 6 ms; TPOT 2 ms.
    result = run(colocated(constant(2.0)), [SimRequest(0, 0.0, 10, 3)])
    assert [round(t * 1e3, 9) for t in result.records[0].chunk_times] == [2.0, 4.0, 6.0]


def test_async_scheduling_makes_a_late_arrival_wait_one_more_step():
    # A runs from 0 ms in 10 ms steps; B arrives at 1 ms. Synchronous: B joins the step
    # composed at 10 ms and gets its token at 20 (TTFT 19). Async: the step from 10 ms was
    # composed at 0 ms, so B joins the one from 20 ms (TTFT 29).
    requests = [SimRequest(0, 0.0, 10, 5), SimRequest(1, 0.001, 10, 1)]
    sync = run(colocated(constant(10.0), async_scheduling=False), requests)
    lookahead = run(colocated(constant(10.0), async_scheduling=True), requests)
    assert round(ttft(sync.records[1]) * 1e3, 9) == 19.0
    assert round(ttft(lookahead.records[1]) * 1e3, 9) == 29.0


def test_disaggregated_request_path():
    # Prefill 2 ms -> first token at 2; KV transfer 5 ms (+1 ms hop) lands at 8; decode steps
    # of 2 ms give tokens at 10 and 12. The router's hop to the prefill worker adds 1 ms too.
    profile = make_profile(constant(2.0), TransferModel(5.0, 1e6))
    layout = Layout(1, 1, profile, profile, EngineLimits(async_scheduling=False), overheads=Overheads(dispatch_ms=1.0))
    result = run(layout, [SimRequest(0, 0.0, 100, 3)])
    assert [round(t * 1e3, 6) for t in result.records[0].chunk_times] == [3.0, 11.0, 13.0]
    assert result.kv_transfers == 1 and result.placements == {"remote": 1}


def test_prefix_cache_hit_skips_the_shared_blocks():
    # Prefix of 40 tokens: the second request computes 60 - 32 (two whole 16-token blocks) = 28.
    step = StepModel(0.0, 0.0, 0.0, 0.0, 0.1, 0.0)
    requests = [SimRequest(0, 0.0, 60, 1, prefix_id=0, prefix_len=40), SimRequest(1, 1.0, 60, 1, prefix_id=0, prefix_len=40)]
    result = run(colocated(step), requests)
    assert [round(ttft(r) * 1e3, 9) for r in result.records] == [6.0, 2.8]


def test_simultaneous_requests_spread_over_engines():
    # With exact load, the second request sees the first on engine A and goes to B: no queueing.
    requests = [SimRequest(0, 0.0, 100, 50), SimRequest(1, 0.0001, 100, 50)]
    result = run(colocated(constant(1.0), engines=2), requests)
    assert result.steps["decode-0"] == result.steps["decode-1"] == 50


def test_kv_capacity_holds_requests_back():
    # 4 blocks of 16 tokens: a 40-token request needs 3, so the second waits for the first.
    requests = [SimRequest(0, 0.0, 40, 2), SimRequest(1, 0.0, 40, 1)]
    result = run(colocated(constant(1.0), num_blocks=4), requests)
    assert [round(ttft(r) * 1e3, 9) for r in result.records] == [1.0, 3.0]


def _router_loop(step: StepModel, message_ms: float, **limits) -> Layout:
    return replace(colocated(step, **limits), overheads=Overheads(router_message_us=message_ms * 1e3))


def test_admissions_queue_at_the_router_loop():
    # 1 ms per message: admitted at 1 and 2 ms. A's step 1-11, its token sent 11-12. B reached the
    # engine mid-step and joins the next one (11-21), its token sent 21-22. TTFT 12 and 22 ms.
    requests = [SimRequest(0, 0.0, 32, 1), SimRequest(1, 0.0, 32, 1)]
    result = run(_router_loop(constant(10.0), 1.0), requests)
    assert [round(ttft(r) * 1e3, 9) for r in result.records] == [12.0, 22.0]


def test_a_busy_router_loop_merges_a_requests_tokens():
    # 2.5 ms per message, 1 ms steps: admitted at 2.5; tokens sampled at 3.5, 4.5, ..., 7.5. The
    # first leaves alone (3.5-6.0); the two that came meanwhile leave together (6.0-8.5), then
    # the last two (8.5-11.0).
    result = run(_router_loop(constant(1.0), 2.5), [SimRequest(0, 0.0, 10, 5)])
    assert [round(t * 1e3, 9) for t in result.records[0].chunk_times] == [6.0, 8.5, 8.5, 11.0, 11.0]


def test_the_first_token_is_sent_before_the_decode_side_opens():
    # Disaggregated, 1 ms per message, 1 ms hop, 2 ms steps, 5 ms transfer: admitted at 1, prefill
    # 2-4, first token sent 4-5, then the decode hop and the transfer land the KV at 11; decode
    # steps 11-13 and 13-15, each token sent 1 ms after its step.
    profile = make_profile(constant(2.0), TransferModel(5.0, 1e6))
    layout = Layout(1, 1, profile, profile, EngineLimits(async_scheduling=False),
                    overheads=Overheads(dispatch_ms=1.0, router_message_us=1000.0))
    result = run(layout, [SimRequest(0, 0.0, 100, 3)])
    assert [round(t * 1e3, 6) for t in result.records[0].chunk_times] == [5.0, 14.0, 16.0]


def test_mixed_role_decode_worker_prefills_for_a_busy_one():
    # Steps: 1 ms + 5 ms per row + 1e-4 ms per causal pair (a 1,000-token prompt: 50 ms), so a
    # prompt beside many rows stalls them. A 3,000-token request fills a third of one worker's
    # 400 blocks (so it is the dearer to decode on); ten short ones then go to the other. A
    # 1,000-token prompt at 2 s: on its decode worker (10 rows) a step of 106 ms breaks the 80 ms
    # ITL SLO; the worker with one row has the headroom (61 ms): it prefills, the other decodes.
    from splitserve.services.router.placement import EngineBudget, PlacementPolicy, PlacementSLO

    step = StepModel(1.0, 5.0, 0.0, 0.0, 0.0, 1e-4)
    profile = make_profile(step, TransferModel(1.0, 1e6))
    policy = PlacementPolicy(profile, profile, PlacementSLO(ttft_ms=5000.0, itl_ms=80.0), EngineBudget(), EngineBudget())
    layout = Layout(0, 2, None, profile, EngineLimits(num_blocks=400, async_scheduling=False), placement="adaptive",
                    placement_policy=policy, mixed=True)
    requests = [SimRequest(0, 0.0, 3000, 400), *(SimRequest(k, 0.5 + 0.01 * k, 10, 400) for k in range(1, 11)),
                SimRequest(11, 2.0, 1000, 4)]
    result = run(layout, requests)
    assert result.placements["mixed:itl"] == 1
    assert result.kv_transfers == 1
    assert sum(result.placements.values()) == len(requests) and "remote:itl" not in result.placements
    assert all(len(r.chunk_times) == r.max_tokens for r in result.records)
    # Without the mixed role the prompt is prefilled on the busy worker, inside its ten rows' steps.
    plain = run(replace(layout, mixed=False), requests)
    assert plain.kv_transfers == 0 and plain.placements == {"colocated": len(requests)}

    def longest_gap_of_the_short_ones(records) -> float:
        return max(b - a for r in records[1:11] for a, b in zip(r.chunk_times, r.chunk_times[1:]))

    assert longest_gap_of_the_short_ones(plain.records) > 0.1
    assert longest_gap_of_the_short_ones(result.records) < 0.08
