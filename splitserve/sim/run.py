"""One simulated sweep point, as ``bench serve`` reports a measured one."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from splitserve.bench.loadgen import LoadResult
from splitserve.bench.metrics import compute_metrics
from splitserve.bench.sweep import PointResult, SweepPoint
from splitserve.sim.cluster import Layout, SimResult, Simulator
from splitserve.sim.workload import WorkloadSpec, bench_requests

_LAYOUT = re.compile(r"^(?:(\d+)P(\d+)D|(\d+)C)$")


def parse_layout(text: str) -> tuple[int, int]:
    """``"3P1D"`` -> (3, 1): prefill and decode workers; ``"4C"`` -> (0, 4): colocated engines."""
    m = _LAYOUT.match(text.strip().upper())
    if not m or (m.group(3) is None and int(m.group(2)) < 1) or (m.group(3) is not None and int(m.group(3)) < 1):
        raise ValueError(f"layout {text!r} is not NPMD (N prefill, M >= 1 decode workers) or NC (N >= 1 colocated engines)")
    if m.group(3) is not None:
        return 0, int(m.group(3))
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class SimPoint:
    result: PointResult
    sim: SimResult


def simulate(layout: Layout, spec: WorkloadSpec, percentiles: Sequence[float] = (50.0, 90.0, 99.0),
             slos_ms: Mapping[str, float] | None = None) -> SimPoint:
    sim = Simulator(layout).run(bench_requests(spec))
    metrics = compute_metrics(sim.records, sim.duration_s, percentiles, slos_ms)
    point = SweepPoint(spec.request_rate, None)
    return SimPoint(PointResult(point, LoadResult(sim.records, sim.duration_s), metrics), sim)
