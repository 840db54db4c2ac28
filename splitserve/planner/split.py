"""Choosing the P:D split with the simulator: the observed workload (request rate, mean prompt
and output lengths, from the router's own request metrics) is replayed on every layout of
the GPU budget (``splitserve.sim.plan``) with the workers' profile, and the split chosen is
the one whose simulated requests meet the SLOs most often (then: the most goodput); among
budgets, the smallest whose best split has ``min_attainment`` of its requests within them.

``WorkloadMeter`` turns successive scrapes of a router's ``/metrics`` into ``WorkloadSample``
(the growth of ``vllm:request_prompt_tokens`` and ``vllm:request_generation_tokens``, the
histograms the router observes once per finished request). ``SplitPlanner.choose`` is pure
apart from the simulation it runs; the planner loop applies its choice to both pools with
their bounds and cooldowns (``Planner.decide_to``).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from prometheus_client.parser import text_string_to_metric_families

from splitserve.bench.metrics import compute_metrics
from splitserve.profile.schema import Profile
from splitserve.sim.cluster import Layout, Simulator
from splitserve.sim.worker import EngineLimits
from splitserve.sim.workload import WorkloadSpec, bench_requests

log = logging.getLogger("splitserve.planner")

PROMPT = "vllm:request_prompt_tokens"
GENERATION = "vllm:request_generation_tokens"


@dataclass(frozen=True)
class WorkloadSample:
    """What the router served over one window."""

    time: float
    request_rate: float  # finished requests per second
    mean_prompt_tokens: float
    mean_output_tokens: float
    num_requests: int


@dataclass(frozen=True)
class _Totals:
    time: float
    num_requests: float
    prompt_tokens: float
    output_tokens: float


def _totals(text: str, now: float) -> _Totals | None:
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in (PROMPT, GENERATION):
            for s in family.samples:
                if s.name == family.name + "_sum":
                    sums[family.name] = sums.get(family.name, 0.0) + s.value
                elif s.name == family.name + "_count":
                    counts[family.name] = counts.get(family.name, 0.0) + s.value
    if PROMPT not in counts or GENERATION not in sums:
        return None
    return _Totals(now, counts[PROMPT], sums[PROMPT], sums[GENERATION])


class WorkloadMeter:
    """Successive scrapes of one router's /metrics -> the workload between them. A router that
    restarted (its counters went down) starts the window over."""

    def __init__(self, min_requests: int = 50) -> None:
        self.min_requests = min_requests
        self._start: _Totals | None = None

    def observe(self, metrics_text: str, now: float) -> WorkloadSample | None:
        """None until ``min_requests`` have finished since the window began; then the sample,
        and a new window begins."""
        totals = _totals(metrics_text, now)
        if totals is None:
            return None
        start = self._start
        if start is None or totals.num_requests < start.num_requests:
            self._start = totals
            return None
        n = totals.num_requests - start.num_requests
        if n < self.min_requests or totals.time <= start.time:
            return None
        self._start = totals
        return WorkloadSample(now, n / (totals.time - start.time), (totals.prompt_tokens - start.prompt_tokens) / n,
                              (totals.output_tokens - start.output_tokens) / n, int(n))


@dataclass(frozen=True)
class Judged:
    label: str
    attainment: float  # share of the simulated requests that met every SLO
    goodput: float  # simulated requests/s within the SLOs

    @property
    def key(self) -> tuple[float, float]:
        return self.attainment, self.goodput


@dataclass(frozen=True)
class SplitChoice:
    num_prefill: int
    num_decode: int
    judged: Judged
    table: tuple[Judged, ...]  # every layout tried, in order



class SplitPlanner:
    """``profile``: the workers' (``splitserve profile``); ``slos_ms``: as ``bench serve --goodput``
    takes them, e.g. {"ttft": 500, "tpot": 25}. A layout is judged by the goodput of
    ``seconds`` of the observed workload (at least 16 requests) at its observed rate."""

    def __init__(self, profile: Profile, slos_ms: Mapping[str, float], limits: EngineLimits | None = None,
                 prefill_profile: Profile | None = None, *, seconds: float = 20.0, min_attainment: float = 0.95,
                 seed: int = 0) -> None:
        if not slos_ms:
            raise ValueError("the split planner needs SLOs (goodput is counted against them)")
        if not 0 < min_attainment <= 1:
            raise ValueError(f"min_attainment must be in (0, 1], got {min_attainment}")
        self.profile = profile
        self.prefill_profile = prefill_profile or profile
        self.slos_ms = dict(slos_ms)
        self.limits = limits or EngineLimits(block_size=profile.block_size)
        self.seconds = seconds
        self.min_attainment = min_attainment
        self.seed = seed

    def _spec(self, sample: WorkloadSample) -> WorkloadSpec:
        return WorkloadSpec(max(16, round(sample.request_rate * self.seconds)), max(1, round(sample.mean_prompt_tokens)),
                            max(1, round(sample.mean_output_tokens)), sample.request_rate, seed=self.seed)

    def judge(self, label: str, layout: Layout, spec: WorkloadSpec) -> Judged:
        requests = bench_requests(spec)
        sim = Simulator(layout).run(requests)
        metrics = compute_metrics(sim.records, sim.duration_s, (99.0,), self.slos_ms)
        return Judged(label, metrics.request_goodput * sim.duration_s / len(requests), metrics.request_goodput)

    def choose(self, sample: WorkloadSample, gpus: range, prefill_range: range, decode_range: range) -> SplitChoice:
        """The best split of the smallest budget in ``gpus`` where it keeps ``min_attainment``
        of the requests within the SLOs (else the best split of the largest budget). Splits outside the pools'
        replica ranges are not tried; P = 0 (decode workers prefill themselves) is, when the
        prefill pool may be empty."""
        if sample.request_rate <= 0:
            raise ValueError("the observed request rate must be positive")
        spec = self._spec(sample)
        base = Layout(1, 1, self.prefill_profile, self.profile, self.limits, placement="remote")
        table: list[Judged] = []
        best: SplitChoice | None = None
        for n in gpus:
            here: SplitChoice | None = None
            for p in prefill_range:
                d = n - p
                if d not in decode_range:
                    continue
                layout = replace(base, num_prefill=p, num_decode=d, prefill_profile=self.prefill_profile if p else None)
                judged = self.judge(f"{p}P{d}D", layout, spec)
                table.append(judged)
                if here is None or judged.key > here.judged.key:
                    here = SplitChoice(p, d, judged, ())
            if here is None:
                continue
            best = here
            if here.judged.attainment >= self.min_attainment:
                break
        if best is None:
            raise ValueError(f"no split of {list(gpus)} GPUs fits the pools' replica ranges")
        return replace(best, table=tuple(table))


class SplitRound:
    """The split planner inside the planner's loop: each round reads the router's metrics, and
    once a window of requests has finished, simulates the budgets the pools' bounds allow and
    keeps the choice; ``desired`` gives each pool's replicas and the reason, or None before the
    first choice (the threshold rules decide meanwhile)."""

    def __init__(self, planner: SplitPlanner, meter: WorkloadMeter, fetch_router_metrics: Callable[[], str],
                 bounds: Mapping[str, tuple[int, int]], clock: Callable[[], float] = time.monotonic) -> None:
        self.planner = planner
        self.meter = meter
        self.fetch = fetch_router_metrics
        self.bounds = dict(bounds)  # pool -> (min replicas, max replicas)
        self.clock = clock
        self.choice: SplitChoice | None = None
        self.sample: WorkloadSample | None = None

    def desired(self) -> dict[str, tuple[int, str]] | None:
        try:
            text = self.fetch()
        except Exception as e:  # the router may be restarting: keep the last choice
            log.warning("reading the router's metrics failed: %s", e)
            text = None
        sample = self.meter.observe(text, self.clock()) if text is not None else None
        if sample is not None:
            (p_min, p_max), (d_min, d_max) = self.bounds["prefill"], self.bounds["decode"]
            self.choice = self.planner.choose(sample, range(p_min + d_min, p_max + d_max + 1), range(p_min, p_max + 1),
                                              range(d_min, d_max + 1))
            self.sample = sample
            log.info("split: %s for %.3g req/s of %.0f/%.0f tokens (%s)", self.choice.judged.label, sample.request_rate,
                     sample.mean_prompt_tokens, sample.mean_output_tokens,
                     ", ".join(f"{j.label} {j.attainment:.0%}" for j in self.choice.table))
        if self.choice is None:
            return None
        s, j = self.sample, self.choice.judged
        reason = (f"simulated {j.label}: {j.attainment:.0%} of requests within SLOs at {s.request_rate:.3g} req/s "
                  f"of {s.mean_prompt_tokens:.0f}/{s.mean_output_tokens:.0f} tokens")
        return {"prefill": (self.choice.num_prefill, reason), "decode": (self.choice.num_decode, reason)}
