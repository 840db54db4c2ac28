"""The planner's decisions over metric sequences, on a fake clock."""
from __future__ import annotations

import pytest

from splitserve.planner import DEFAULT_POLICIES, Planner, PoolPolicy, PoolSample, Target

TICK = 15.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def prefill_sample(clock, waiting: float, ttft: float | None = 0.3, ready: int = 1) -> PoolSample:
    return PoolSample(time=clock.now, num_ready_replicas=ready, num_waiting_requests=waiting * ready,
                      num_running_requests=4.0 * ready, kv_cache_utilization=0.2,
                      ttft_p90_seconds=ttft, itl_p90_seconds=None)


def decode_sample(clock, kv: float, itl: float | None = 0.05, ready: int = 1) -> PoolSample:
    return PoolSample(time=clock.now, num_ready_replicas=ready, num_waiting_requests=0.0,
                      num_running_requests=32.0 * ready, kv_cache_utilization=kv,
                      ttft_p90_seconds=None, itl_p90_seconds=itl)


POLICIES = {
    "prefill": PoolPolicy(targets=(Target("waiting_per_replica", high=4, low=0.5), Target("ttft_p90_seconds", high=2, low=0.5)),
                          min_replicas=1, max_replicas=4, scale_up_cooldown_s=60, scale_down_cooldown_s=300,
                          scale_up_stabilization_s=30, scale_down_stabilization_s=120, smoothing=0.5),
    "decode": PoolPolicy(targets=(Target("kv_cache_utilization", high=0.85, low=0.4), Target("itl_p90_seconds", high=0.1, low=0.04)),
                         min_replicas=1, max_replicas=3, scale_up_cooldown_s=60, scale_down_cooldown_s=300,
                         scale_up_stabilization_s=30, scale_down_stabilization_s=120, smoothing=0.5),
}


class Pools:
    """Drives the planner like the loop does, applying every decision to the replica counts."""

    def __init__(self, replicas: dict[str, int] | None = None, policies=POLICIES):
        self.clock = FakeClock()
        self.planner = Planner(policies, max_sample_age_s=3 * TICK, clock=self.clock)
        self.replicas = dict(replicas or {"prefill": 1, "decode": 1})
        self.history: dict[str, list[int]] = {pool: [] for pool in self.replicas}

    def tick(self, samples: dict) -> dict:
        decisions = {}
        for pool, sample in samples.items():
            d = self.planner.decide(pool, sample, self.replicas[pool])
            self.replicas[pool] = d.desired_replicas
            self.history[pool].append(d.desired_replicas)
            decisions[pool] = d
        self.clock.now += TICK
        return decisions

    def run(self, ticks: int, make_samples) -> None:
        for _ in range(ticks):
            self.tick(make_samples(self))

    def changes(self, pool: str) -> int:
        h = self.history[pool]
        return sum(1 for a, b in zip(h, h[1:]) if a != b)


def test_prefill_scales_up_on_queue_while_decode_holds():
    pools = Pools()
    pools.run(4, lambda p: {"prefill": prefill_sample(p.clock, waiting=12), "decode": decode_sample(p.clock, kv=0.6)})
    assert pools.replicas == {"prefill": 2, "decode": 1}
    # Stabilization: the signal must hold for 30 s (two ticks) before the first step.
    assert pools.history["prefill"][:3] == [1, 1, 2]


def test_decode_scales_up_on_kv_use_while_prefill_holds():
    pools = Pools()
    pools.run(4, lambda p: {"prefill": prefill_sample(p.clock, waiting=2), "decode": decode_sample(p.clock, kv=0.95)})
    assert pools.replicas == {"prefill": 1, "decode": 2}


def test_decode_scales_up_on_inter_token_latency_alone():
    pools = Pools()
    pools.run(4, lambda p: {"decode": decode_sample(p.clock, kv=0.5, itl=0.3)})
    assert pools.replicas["decode"] == 2
    assert "itl_p90_seconds" in pools.planner.decide("decode", decode_sample(pools.clock, kv=0.5, itl=0.3), 2).reason


def test_scale_down_each_pool_independently():
    pools = Pools({"prefill": 3, "decode": 3})
    # Prefill idle (no TTFT observations at all), decode busy but within targets.
    pools.run(12, lambda p: {"prefill": prefill_sample(p.clock, waiting=0, ttft=None, ready=p.replicas["prefill"]),
                             "decode": decode_sample(p.clock, kv=0.6, ready=p.replicas["decode"])})
    assert pools.replicas["decode"] == 3
    assert pools.replicas["prefill"] == 2  # one step: the next waits for the scale-down cooldown
    pools.run(20, lambda p: {"prefill": prefill_sample(p.clock, waiting=0, ttft=None, ready=p.replicas["prefill"]),
                             "decode": decode_sample(p.clock, kv=0.1, itl=0.02, ready=p.replicas["decode"])})
    assert pools.replicas["prefill"] == 1
    assert pools.replicas["decode"] == 2


def test_scale_up_cooldown_spaces_steps_one_at_a_time():
    pools = Pools()
    pools.run(20, lambda p: {"prefill": prefill_sample(p.clock, waiting=50, ready=p.replicas["prefill"])})
    h = pools.history["prefill"]
    steps = [i for i, (a, b) in enumerate(zip(h, h[1:])) if a != b]
    assert all(h[i + 1] - h[i] == 1 for i in steps), h  # one replica per step
    # After each step the pool needs the cooldown (60 s) and a fresh stabilization window (30 s).
    assert all((b - a) * TICK >= 60 for a, b in zip(steps, steps[1:])), h
    assert h[-1] == 4


def test_scale_down_waits_for_cooldown_after_scale_up():
    pools = Pools()
    pools.run(3, lambda p: {"prefill": prefill_sample(p.clock, waiting=20, ready=p.replicas["prefill"])})
    assert pools.replicas["prefill"] == 2
    up_at = pools.clock.now - TICK
    # Load disappears at once: the pool must not shrink within scale_down_cooldown_s of growing.
    for _ in range(40):
        d = pools.tick({"prefill": prefill_sample(pools.clock, waiting=0, ttft=0.1, ready=pools.replicas["prefill"])})["prefill"]
        if d.changed:
            assert pools.clock.now - TICK - up_at >= 300
            break
    else:
        pytest.fail("never scaled down")
    assert pools.replicas["prefill"] == 1


def test_bounds_respected():
    pools = Pools({"prefill": 4, "decode": 1})
    pools.run(30, lambda p: {"prefill": prefill_sample(p.clock, waiting=100, ready=p.replicas["prefill"]),
                             "decode": decode_sample(p.clock, kv=0.0, itl=0.01, ready=p.replicas["decode"])})
    assert max(pools.history["prefill"]) == 4 and min(pools.history["decode"]) == 1
    assert pools.planner.decide("prefill", prefill_sample(pools.clock, 100, ready=4), 4).reason.startswith("at maxReplicas")


def test_out_of_bounds_replicas_are_brought_back_first():
    pools = Pools({"prefill": 7, "decode": 0})
    d = pools.tick({"prefill": None, "decode": None})
    assert d["prefill"].desired_replicas == 4 and d["decode"].desired_replicas == 1


def test_noisy_metrics_do_not_flap():
    # Queue per replica swings between 1 and 6 around a mean of 3.5: inside the band
    # (low 0.5, high 4) on average, above `high` on every other sample.
    pools = Pools()
    noise = [1, 6, 2, 5, 1, 6, 3, 5, 0.8, 6.5]
    pools.run(60, lambda p: {"prefill": prefill_sample(p.clock, waiting=noise[len(p.history["prefill"]) % len(noise)],
                                                      ready=p.replicas["prefill"])})
    assert pools.changes("prefill") == 0, pools.history["prefill"]


def test_noisy_load_around_a_real_increase_moves_once():
    # Load rises for good to ~9.6 queued prompts in total, with noise on top: the pool grows
    # to 3 (3.2 per replica, inside the band) and stays, with no back-and-forth.
    pools = Pools()
    noise = [9, 6, 11, 7, 8, 10, 5, 9]
    total = lambda p: noise[len(p.history["prefill"]) % len(noise)] * 1.2  # noqa: E731
    pools.run(40, lambda p: {"prefill": prefill_sample(p.clock, waiting=total(p) / p.replicas["prefill"],
                                                      ready=p.replicas["prefill"])})
    h = pools.history["prefill"]
    assert h == sorted(h), h  # never went down
    assert h[-1] == 3


def test_missing_metrics_change_nothing():
    pools = Pools({"prefill": 2, "decode": 2})
    # High load long enough to be ready to act, then the scrape fails: no action.
    pools.run(2, lambda p: {"prefill": prefill_sample(p.clock, waiting=50, ready=2), "decode": decode_sample(p.clock, kv=0.99, ready=2)})
    for _ in range(20):
        d = pools.tick({"prefill": None, "decode": None})
        assert not d["prefill"].changed and not d["decode"].changed
        assert d["prefill"].reason == "no metrics"
    # The stabilization window starts over once metrics return.
    d = pools.tick({"prefill": prefill_sample(pools.clock, waiting=50, ready=2), "decode": None})
    assert not d["prefill"].changed
    assert pools.replicas == {"prefill": 2, "decode": 2}


def test_stale_metrics_change_nothing():
    pools = Pools()
    old = prefill_sample(pools.clock, waiting=100)
    pools.clock.now += 10 * TICK
    for _ in range(10):
        d = pools.tick({"prefill": old})["prefill"]
        assert not d.changed and "old" in d.reason


def test_missing_gauge_holds_but_idle_latency_allows_scale_down():
    pools = Pools({"decode": 2})
    no_kv = lambda p: PoolSample(p.clock.now, 2, 0, 0, kv_cache_utilization=None, ttft_p90_seconds=None, itl_p90_seconds=None)  # noqa: E731
    pools.run(30, lambda p: {"decode": no_kv(p)})
    assert pools.changes("decode") == 0
    assert "kv_cache_utilization" in pools.planner.decide("decode", no_kv(pools), 2).reason
    pools.run(30, lambda p: {"decode": decode_sample(p.clock, kv=0.05, itl=None, ready=p.replicas["decode"])})
    assert pools.replicas["decode"] == 1


def test_no_scale_up_while_new_pods_are_still_loading():
    pools = Pools({"prefill": 2})
    # Deployment asks for 2, only 1 is ready (the other loads the model).
    pools.run(20, lambda p: {"prefill": prefill_sample(p.clock, waiting=30, ready=1)})
    assert pools.replicas["prefill"] == 2
    d = pools.planner.decide("prefill", prefill_sample(pools.clock, waiting=30, ready=1), 2)
    assert "become ready" in d.reason


def test_default_policies_are_valid_and_cover_both_pools():
    assert set(DEFAULT_POLICIES) == {"prefill", "decode"}
    assert {t.signal for t in DEFAULT_POLICIES["prefill"].targets} == {"waiting_per_replica", "ttft_p90_seconds"}
    assert {t.signal for t in DEFAULT_POLICIES["decode"].targets} == {"kv_cache_utilization", "itl_p90_seconds"}
