"""The planner's decisions: a pure function of metric samples, the clock and its own memory.

Each pool is decided on its own. A pool grows by one replica when any target's smoothed
signal has stayed above its ``high`` mark for the scale-up stabilization window, and shrinks
by one when every signal has stayed below its ``low`` mark for the scale-down window; in
between (the hysteresis band) it holds. Cooldowns space out consecutive changes, bounds are
enforced first, and a missing or stale sample changes nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

from splitserve.planner.policy import LATENCY_SIGNALS, PoolPolicy


@dataclass(frozen=True)
class PoolSample:
    """One look at a pool's metrics, summed or averaged over its ready pods."""

    time: float  # on the planner's clock
    num_ready_replicas: int  # pods that answered
    num_waiting_requests: float
    num_running_requests: float
    kv_cache_utilization: float | None  # used / (used + free) KV blocks
    ttft_p90_seconds: float | None  # None: nothing finished since the last sample
    itl_p90_seconds: float | None

    def signal(self, name: str) -> float | None:
        if name == "waiting_per_replica":
            return self.num_waiting_requests / self.num_ready_replicas
        if name == "running_per_replica":
            return self.num_running_requests / self.num_ready_replicas
        return getattr(self, name)


@dataclass(frozen=True)
class Decision:
    pool: str
    current_replicas: int
    desired_replicas: int
    reason: str

    @property
    def changed(self) -> bool:
        return self.desired_replicas != self.current_replicas


@dataclass
class _PoolState:
    smoothed: dict[str, float] = field(default_factory=dict)
    up_since: float | None = None  # when the scale-up condition started holding
    down_since: float | None = None
    last_scale_up: float | None = None
    last_scale_down: float | None = None

    def forget_signals(self) -> None:
        self.smoothed.clear()
        self.up_since = self.down_since = None


class Planner:
    """Decides desired replicas per pool. Call ``decide`` once per pool per tick."""

    def __init__(self, policies: Mapping[str, PoolPolicy], *, max_sample_age_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self._policies = dict(policies)
        self._max_sample_age_s = max_sample_age_s
        self._clock = clock
        self._states = {pool: _PoolState() for pool in self._policies}

    def decide(self, pool: str, sample: PoolSample | None, current_replicas: int) -> Decision:
        """The replicas ``pool`` should have. A changed decision is taken as applied: the
        cooldown starts now, so a failed patch is retried only after it."""
        policy, state, now = self._policies[pool], self._states[pool], self._clock()
        hold = lambda reason: Decision(pool, current_replicas, current_replicas, reason)  # noqa: E731

        if current_replicas < policy.min_replicas:
            return self._scale(pool, current_replicas, policy.min_replicas, "below minReplicas", now)
        if current_replicas > policy.max_replicas:
            return self._scale(pool, current_replicas, policy.max_replicas, "above maxReplicas", now)
        if sample is None or sample.num_ready_replicas < 1:
            state.forget_signals()
            return hold("no metrics")
        if now - sample.time > self._max_sample_age_s:
            state.forget_signals()
            return hold(f"metrics are {now - sample.time:.0f}s old")

        values = self._smooth(policy, state, sample)
        missing = [t.signal for t in policy.targets if values[t.signal] is None and t.signal not in LATENCY_SIGNALS]
        if missing:
            state.forget_signals()
            return hold(f"no value for {', '.join(missing)}")
        above = [t for t in policy.targets if values[t.signal] is not None and values[t.signal] > t.high]
        all_below = all(values[t.signal] is None or values[t.signal] < t.low for t in policy.targets)
        state.up_since = (state.up_since if state.up_since is not None else now) if above else None
        state.down_since = (state.down_since if state.down_since is not None else now) if all_below and not above else None

        if above:
            why = ", ".join(f"{t.signal} {values[t.signal]:.3g} > {t.high:g}" for t in above)
            if current_replicas >= policy.max_replicas:
                return hold(f"at maxReplicas ({why})")
            if sample.num_ready_replicas < current_replicas:
                return hold(f"waiting for {current_replicas - sample.num_ready_replicas} pods to become ready ({why})")
            if now - state.up_since < policy.scale_up_stabilization_s:
                return hold(f"scale-up signal held {now - state.up_since:.0f}s of {policy.scale_up_stabilization_s:g}s ({why})")
            if state.last_scale_up is not None and now - state.last_scale_up < policy.scale_up_cooldown_s:
                return hold(f"scale-up cooldown ({why})")
            return self._scale(pool, current_replicas, current_replicas + 1, why, now)
        if state.down_since is not None:
            if current_replicas <= policy.min_replicas:
                return hold("at minReplicas")
            if now - state.down_since < policy.scale_down_stabilization_s:
                return hold(f"scale-down signal held {now - state.down_since:.0f}s of {policy.scale_down_stabilization_s:g}s")
            last_change = max((t for t in (state.last_scale_up, state.last_scale_down) if t is not None), default=None)
            if last_change is not None and now - last_change < policy.scale_down_cooldown_s:
                return hold("scale-down cooldown")
            return self._scale(pool, current_replicas, current_replicas - 1, "all signals below their low marks", now)
        return hold("within targets")

    def decide_to(self, pool: str, desired: int, current_replicas: int, reason: str) -> Decision:
        """Moves ``pool`` toward a size chosen elsewhere (the split planner), within its bounds
        and its cooldowns, one step of any size at a time."""
        policy, state, now = self._policies[pool], self._states[pool], self._clock()
        desired = min(max(desired, policy.min_replicas), policy.max_replicas)
        if desired > current_replicas and state.last_scale_up is not None and now - state.last_scale_up < policy.scale_up_cooldown_s:
            return Decision(pool, current_replicas, current_replicas, f"scale-up cooldown ({reason})")
        if desired < current_replicas:
            last_change = max((t for t in (state.last_scale_up, state.last_scale_down) if t is not None), default=None)
            if last_change is not None and now - last_change < policy.scale_down_cooldown_s:
                return Decision(pool, current_replicas, current_replicas, f"scale-down cooldown ({reason})")
        if desired == current_replicas:
            return Decision(pool, current_replicas, current_replicas, reason)
        return self._scale(pool, current_replicas, desired, reason, now)

    def _smooth(self, policy: PoolPolicy, state: _PoolState, sample: PoolSample) -> dict[str, float | None]:
        values: dict[str, float | None] = {}
        for target in policy.targets:
            raw = sample.signal(target.signal)
            if raw is None:
                # An idle latency window says nothing about the trend; keep the average.
                values[target.signal] = None
                continue
            prev = state.smoothed.get(target.signal)
            value = raw if prev is None else policy.smoothing * raw + (1 - policy.smoothing) * prev
            state.smoothed[target.signal] = values[target.signal] = value
        return values

    def _scale(self, pool: str, current: int, desired: int, reason: str, now: float) -> Decision:
        state = self._states[pool]
        if desired > current:
            state.last_scale_up = now
        else:
            state.last_scale_down = now
        state.up_since = state.down_since = None
        return Decision(pool, current, desired, reason)
