"""One planner round per interval: read each pool's scale and metrics, decide, patch."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from splitserve.planner.decision import Decision, Planner, PoolSample
from splitserve.planner.kube import Scale
from splitserve.planner.split import SplitRound

log = logging.getLogger("splitserve.planner")


class Scaler(Protocol):
    def get_scale(self) -> Scale: ...
    def set_replicas(self, replicas: int) -> None: ...


class MetricsSource(Protocol):
    def collect(self) -> PoolSample | None: ...


@dataclass(frozen=True)
class PoolHandle:
    name: str  # "prefill" or "decode", as in the policies
    scaler: Scaler
    source: MetricsSource


class PlannerTelemetry:
    """The planner's own /metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.current = Gauge("splitserve_planner_current_replicas", "Replicas the Deployment asks for",
                             ["pool"], registry=self.registry)
        self.desired = Gauge("splitserve_planner_desired_replicas", "Replicas the planner decided on",
                             ["pool"], registry=self.registry)
        self.scalings = Counter("splitserve_planner_scalings", "Replica changes the planner applied",
                                ["pool", "direction"], registry=self.registry)
        self.missing = Counter("splitserve_planner_missing_metrics", "Rounds without usable metrics",
                               ["pool"], registry=self.registry)
        self.errors = Counter("splitserve_planner_errors", "Kubernetes API calls that failed",
                              ["pool"], registry=self.registry)


def run_once(planner: Planner, pools: list[PoolHandle], *, dry_run: bool = False,
             telemetry: PlannerTelemetry | None = None, split: SplitRound | None = None) -> list[Decision]:
    """One round over all pools; a failing pool is logged and does not stop the others.
    ``split``: the simulator chooses both pools' sizes once it has seen the workload."""
    decisions = []
    targets = split.desired() if split is not None else None
    for pool in pools:
        try:
            current = pool.scaler.get_scale().replicas
        except Exception as e:
            log.warning("%s: reading the scale failed: %s", pool.name, e)
            if telemetry:
                telemetry.errors.labels(pool.name).inc()
            continue
        sample = pool.source.collect()
        if targets is not None:
            decision = planner.decide_to(pool.name, targets[pool.name][0], current, targets[pool.name][1])
        else:
            decision = planner.decide(pool.name, sample, current)
        decisions.append(decision)
        if telemetry:
            telemetry.current.labels(pool.name).set(current)
            telemetry.desired.labels(pool.name).set(decision.desired_replicas)
            if sample is None:
                telemetry.missing.labels(pool.name).inc()
        if not decision.changed:
            log.debug("%s: holding at %d: %s", pool.name, current, decision.reason)
            continue
        log.info("%s: %s %d -> %d: %s", pool.name, "dry run, would scale" if dry_run else "scaling",
                 current, decision.desired_replicas, decision.reason)
        if dry_run:
            continue
        try:
            pool.scaler.set_replicas(decision.desired_replicas)
        except Exception as e:
            log.error("%s: patching the scale failed: %s", pool.name, e)
            if telemetry:
                telemetry.errors.labels(pool.name).inc()
            continue
        if telemetry:
            direction = "up" if decision.desired_replicas > current else "down"
            telemetry.scalings.labels(pool.name, direction).inc()
    return decisions


def run_forever(planner: Planner, pools: list[PoolHandle], *, interval_s: float, stop: threading.Event,
                dry_run: bool = False, telemetry: PlannerTelemetry | None = None, split: SplitRound | None = None) -> None:
    while not stop.is_set():
        run_once(planner, pools, dry_run=dry_run, telemetry=telemetry, split=split)
        stop.wait(interval_s)
