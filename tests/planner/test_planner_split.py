"""The split planner: the simulator sizes both pools for constructed workloads, the workload is
read from a router's request metrics, and the planner loop applies the choice within bounds.

The profile has exact, chosen costs (5 ms per step for the weights plus 0.02 ms per row, or
0.1 ms per token computed when that is larger), so each choice can be reasoned out:
- prefill-heavy, 9 req/s of 2,000-token prompts: 200 ms of prefill each, 1.8 prefill GPUs'
  worth; at 90% load 2 prefill workers queue a quarter of the prompts past the 1 s TTFT SLO,
  at 60% 3 do not: 3P1D;
- decode-heavy, 40 req/s of 400 output tokens: 16,000 tokens/s. Under the 10 ms TPOT SLO a
  decode worker runs at most 100 rows (10,000 tokens/s), so one falls behind, while two run
  ~48-row steps of ~6 ms: 1P2D, the smallest budget that meets the SLOs.
"""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from splitserve.planner import Planner, PoolPolicy, Target
from splitserve.planner.kube import Scale
from splitserve.planner.loop import PoolHandle, run_once
from splitserve.planner.split import SplitPlanner, SplitRound, WorkloadMeter, WorkloadSample
from splitserve.profile.schema import ModelShape, Profile
from splitserve.profile.step_model import StepModel, TransferModel

PROFILE = Profile(
    source="derived", device="test", model=ModelShape("test", 2, 1, 8, "float32", 1000), tp_size=1, block_size=16,
    transport="test", prefill=(), decode=(), transfer=(),
    step_model=StepModel(weight_ms=5.0, seq_ms=0.02, kv_ms_per_token=0.0, compute_base_ms=0.0, token_ms=0.1, pair_ms=0.0),
    transfer_model=TransferModel(1.0, 100.0),
)
SLOS = {"ttft": 1000.0, "tpot": 10.0}


def planner() -> SplitPlanner:
    return SplitPlanner(PROFILE, SLOS, seconds=10.0)


def test_prefill_heavy_workload_gets_three_prefill_workers():
    choice = planner().choose(WorkloadSample(0.0, 9.0, 2000, 8, 500), range(2, 5), range(1, 4), range(1, 4))
    assert (choice.num_prefill, choice.num_decode) == (3, 1)
    judged = {j.label: j for j in choice.table}
    assert judged["2P1D"].attainment < 0.95 <= judged["3P1D"].attainment
    assert judged["3P1D"].attainment > judged["2P2D"].attainment  # same 4 GPUs, split the other way


def test_decode_heavy_workload_on_four_gpus_gets_three_decode_workers():
    choice = planner().choose(WorkloadSample(0.0, 40.0, 50, 400, 500), range(4, 5), range(1, 4), range(1, 4))
    assert (choice.num_prefill, choice.num_decode) == (1, 3)
    judged = {j.label: j for j in choice.table}
    assert judged["3P1D"].attainment < 0.95  # the prefill-heavy choice would fail here


def test_decode_heavy_workload_gets_the_smallest_budget_that_meets_the_slos():
    choice = planner().choose(WorkloadSample(0.0, 40.0, 50, 400, 500), range(2, 5), range(1, 4), range(1, 4))
    assert (choice.num_prefill, choice.num_decode) == (1, 2)
    assert [j.label for j in choice.table] == ["1P1D", "1P2D", "2P1D"]  # stopped at 3 GPUs
    judged = {j.label: j for j in choice.table}
    assert judged["1P1D"].attainment < 0.95 <= judged["1P2D"].attainment
    assert judged["2P1D"].attainment < 0.95


def test_the_choice_is_the_best_of_its_budget():
    choice = planner().choose(WorkloadSample(0.0, 9.0, 2000, 8, 500), range(4, 5), range(1, 4), range(1, 4))
    assert choice.judged == max(choice.table, key=lambda j: j.key)


def test_an_overloaded_budget_still_gives_its_best_split():
    # Nothing of 2 GPUs keeps up with 30 req/s of long prompts: the best it has is chosen.
    choice = planner().choose(WorkloadSample(0.0, 30.0, 2000, 8, 500), range(2, 3), range(1, 2), range(1, 2))
    assert (choice.num_prefill, choice.num_decode) == (1, 1) and choice.judged.attainment < 0.95


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="SLOs"):
        SplitPlanner(PROFILE, {})
    with pytest.raises(ValueError, match="min_attainment"):
        SplitPlanner(PROFILE, SLOS, min_attainment=0)
    with pytest.raises(ValueError, match="rate"):
        planner().choose(WorkloadSample(0.0, 0.0, 100, 10, 500), range(2, 3), range(1, 2), range(1, 2))


class RouterMetrics:
    """A router's request histograms, as it exports them (generate_latest)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.prompt = Histogram("vllm:request_prompt_tokens", "", ["model_name"], buckets=(100, 1000, 10000), registry=self.registry)
        self.generation = Histogram("vllm:request_generation_tokens", "", ["model_name"], buckets=(100, 1000), registry=self.registry)
        self.prompt.labels("m"), self.generation.labels("m")  # exported from the start, at zero

    def finish(self, n: int, prompt: int, output: int) -> None:
        for _ in range(n):
            self.prompt.labels("m").observe(prompt)
            self.generation.labels("m").observe(output)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def test_workload_meter_sample_values():
    router, meter = RouterMetrics(), WorkloadMeter(min_requests=10)
    assert meter.observe(router.text(), 100.0) is None
    router.finish(4, 1000, 100)
    assert meter.observe(router.text(), 102.0) is None  # 4 < 10: the window goes on
    router.finish(16, 2000, 300)
    sample = meter.observe(router.text(), 110.0)
    assert sample == WorkloadSample(110.0, 20 / 10.0, (4 * 1000 + 16 * 2000) / 20, (4 * 100 + 16 * 300) / 20, 20)


def test_workload_meter_starts_over_when_the_router_restarts():
    first, meter = RouterMetrics(), WorkloadMeter(min_requests=1)
    first.finish(50, 100, 10)
    meter.observe(first.text(), 0.0)
    restarted = RouterMetrics()
    restarted.finish(3, 100, 10)
    assert meter.observe(restarted.text(), 10.0) is None  # counters went down: a new window
    restarted.finish(2, 400, 10)
    assert meter.observe(restarted.text(), 20.0) == WorkloadSample(20.0, 0.2, 400, 10, 2)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


POLICY = dict(targets=(Target("waiting_per_replica", high=4, low=0.5),), min_replicas=1, max_replicas=3,
              scale_up_cooldown_s=60, scale_down_cooldown_s=300)


def test_decide_to_keeps_bounds_and_cooldowns():
    clock = FakeClock()
    p = Planner({"prefill": PoolPolicy(**POLICY)}, clock=clock)
    assert p.decide_to("prefill", 5, 1, "sim").desired_replicas == 3  # max_replicas
    clock.now += 30
    assert p.decide_to("prefill", 3, 3, "sim").desired_replicas == 3
    assert p.decide_to("prefill", 1, 3, "sim").reason.startswith("scale-down cooldown")
    clock.now += 300
    assert p.decide_to("prefill", 0, 3, "sim").desired_replicas == 1  # min_replicas


class FakeScaler:
    def __init__(self, replicas: int) -> None:
        self.replicas = replicas

    def get_scale(self) -> Scale:
        return Scale(self.replicas, "app=test")

    def set_replicas(self, replicas: int) -> None:
        self.replicas = replicas


class NoMetrics:
    def collect(self):
        return None


def test_planner_loop_sizes_both_pools_from_the_simulation():
    clock, router = FakeClock(), RouterMetrics()
    split = SplitRound(planner(), WorkloadMeter(min_requests=50), router.text, {"prefill": (1, 3), "decode": (1, 3)}, clock)
    p = Planner({"prefill": PoolPolicy(**POLICY), "decode": PoolPolicy(**POLICY)}, clock=clock)
    pools = [PoolHandle("prefill", FakeScaler(1), NoMetrics()), PoolHandle("decode", FakeScaler(1), NoMetrics())]
    # No workload seen yet: the threshold rules hold (no metrics).
    assert [d.reason for d in run_once(p, pools, split=split)] == ["no metrics", "no metrics"]
    router.finish(90, 2000, 8)  # 9 req/s of long prompts over 10 s
    clock.now += 10
    decisions = run_once(p, pools, split=split)
    assert [(d.current_replicas, d.desired_replicas) for d in decisions] == [(1, 3), (1, 1)]
    assert decisions[0].reason.startswith("simulated 3P1D")
    assert (pools[0].scaler.replicas, pools[1].scaler.replicas) == (3, 1)


def test_a_worker_metrics_page_gives_no_workload():
    text = "# TYPE splitserve_waiting_requests gauge\nsplitserve_waiting_requests 3.0\n"
    assert WorkloadMeter(min_requests=1).observe(text, 0.0) is None


def test_split_profile_needs_the_router_metrics_url(capsys):
    from splitserve.planner.cli import run_planner

    with pytest.raises(SystemExit) as e:
        run_planner(["--namespace", "n", "--prefill-deployment", "p", "--decode-deployment", "d", "--split-profile", "x.json"])
    assert e.value.code == 2
    assert "--split-profile needs --router-metrics-url" in capsys.readouterr().err
