"""Choosing a layout for N GPUs: every P:D split, N colocated engines, and adaptive placement,
each run at a grid of rates; a layout's capacity is its best goodput at the SLOs. This is
what a planner asks before it sizes the pools (``splitserve sim --plan-gpus N``)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from splitserve.bench.metrics import compute_metrics
from splitserve.sim.cluster import Layout, Simulator
from splitserve.sim.workload import WorkloadSpec, bench_requests


@dataclass(frozen=True)
class Capacity:
    label: str
    layout: Layout
    goodput: float  # the best over the rates tried, requests/s meeting the SLOs
    rate: float  # the rate it was reached at


def candidate_layouts(gpus: int, base: Layout, adaptive: Layout | None) -> list[tuple[str, Layout]]:
    """(label, layout) for N colocated engines, every P prefill + N-P decode workers, and the
    same with ``adaptive``'s placement policy when given. TP=1 workers: one GPU each."""
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    out = [(f"{gpus}C", replace(base, num_prefill=0, num_decode=gpus, prefill_profile=None, placement="remote",
                                 placement_policy=None))]
    for p in range(1, gpus):
        split = replace(base, num_prefill=p, num_decode=gpus - p, prefill_profile=base.prefill_profile or base.decode_profile,
                        placement="remote", placement_policy=None)
        out.append((f"{p}P{gpus - p}D", split))
        if adaptive is not None:
            out.append((f"{p}P{gpus - p}D-adaptive", replace(split, placement="adaptive", placement_policy=adaptive.placement_policy)))
    return out


def capacity(label: str, layout: Layout, workload: WorkloadSpec, rates: Sequence[float], seconds_per_rate: float,
             slos_ms: Mapping[str, float]) -> Capacity:
    best = Capacity(label, layout, 0.0, 0.0)
    for rate in rates:
        spec = replace(workload, request_rate=rate, num_prompts=max(16, round(rate * seconds_per_rate)))
        sim = Simulator(layout).run(bench_requests(spec))
        goodput = compute_metrics(sim.records, sim.duration_s, (99.0,), slos_ms).request_goodput
        if goodput > best.goodput:
            best = Capacity(label, layout, goodput, rate)
    return best


def rank(gpus: int, base: Layout, adaptive: Layout | None, workload: WorkloadSpec, rates: Sequence[float],
         seconds_per_rate: float, slos_ms: Mapping[str, float]) -> list[Capacity]:
    """Every candidate layout's capacity, the best first."""
    if not slos_ms:
        raise ValueError("a plan needs SLOs (goodput is counted against them)")
    found = [capacity(label, layout, workload, rates, seconds_per_rate, slos_ms)
             for label, layout in candidate_layouts(gpus, base, adaptive)]
    return sorted(found, key=lambda c: -c.goodput)
