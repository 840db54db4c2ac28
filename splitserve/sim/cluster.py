"""The discrete-event simulation of one serving layout under one workload.

Events, in time order (ties in the order they were scheduled):
  arrive      the router places the request: on a prefill worker (disaggregated) or on a
              decode worker that prefills it itself (colocated, or a local placement)
  deliver     the request reaches the worker the router chose, ``overhead.dispatch_ms`` later
  step_end    a worker's step is over: sampled tokens reach the client, finished prompts
              start their KV transfer, and the worker starts its next step if it has work
  landed      a prompt's KV is on the decode worker: the request joins its batch
  loop        the router's event loop finished one message (with ``router_message_us``):
              an admission (the request is placed then) or a request's waiting tokens (they
              reach the client then; a prefill's first token also hands the request to decode)

The router picks workers with the real policy's cost functions
(``services/router/routing.py``) applied to the simulated workers' load, and, for the
adaptive layout, the real placement policy (``services/router/placement.py``), so the
simulation exercises the decisions the router makes. Tokens reach the client
``overhead.stream_ms`` after the step that sampled them ends. The output is one
``RequestRecord`` per request, as ``bench serve`` records them, so the metrics and
goodput are computed by the same code.
"""
from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from splitserve.bench.records import RequestRecord, Usage
from splitserve.controlplane.types import LiveWorker, WorkerInfo
from splitserve.profile.schema import Profile
from splitserve.services.router.placement import PlacementPolicy, PlacementState
from splitserve.services.router.routing import CostWeights, PrefixAwarePolicy
from splitserve.sim.router_loop import RouterLoop
from splitserve.sim.router_view import RouterView, ViewTiming
from splitserve.sim.worker import EngineLimits, Job, SimWorker
from splitserve.sim.workload import SimRequest


@dataclass(frozen=True)
class Overheads:
    """Latency outside the engines' steps, in milliseconds."""

    dispatch_ms: float = 0.0  # router -> worker, per hop (the decode hop after a prefill too)
    stream_ms: float = 0.0  # a sampled token -> the client, when nothing is queued before it
    # The router's event loop (router_loop.py): each admission and each message to a client
    # costs it this much; 0 leaves it out (every message is sent the moment it exists).
    router_message_us: float = 0.0

    def __post_init__(self) -> None:
        if self.dispatch_ms < 0 or self.stream_ms < 0 or self.router_message_us < 0:
            raise ValueError(f"overheads must be >= 0: {self}")


@dataclass(frozen=True)
class Layout:
    """``num_prefill`` prefill workers and ``num_decode`` decode workers (0 prefill:
    colocated engines). ``placement``: "remote" (every prompt to a prefill worker, as
    ``--prefill-threshold 0``), "threshold" (prompts under ``prefill_threshold`` tokens
    prefill on the decode worker), "adaptive" (``services/router/placement.py``)."""

    num_prefill: int
    num_decode: int
    prefill_profile: Profile | None
    decode_profile: Profile
    limits: EngineLimits = EngineLimits()
    prefill_limits: EngineLimits | None = None  # None: ``limits``
    placement: str = "remote"
    prefill_threshold: int = 0
    overheads: Overheads = Overheads()
    placement_policy: PlacementPolicy | None = None  # for "adaptive"
    mixed: bool = False  # decode workers in a mixed role (--accept-prefill): they prefill for each other too

    def __post_init__(self) -> None:
        if self.num_decode < 1 or self.num_prefill < 0:
            raise ValueError("a layout needs at least one decode worker and no negative pool")
        if self.num_prefill and self.prefill_profile is None:
            raise ValueError("prefill workers need a prefill profile")
        if self.placement not in ("remote", "threshold", "adaptive"):
            raise ValueError(f"placement must be remote, threshold or adaptive, got {self.placement!r}")
        if self.placement == "adaptive" and self.placement_policy is None:
            raise ValueError("adaptive placement needs a placement_policy")
        if self.mixed and self.placement != "adaptive":
            raise ValueError("mixed-role decode workers need adaptive placement (it decides when they have headroom)")

    @property
    def num_gpus(self) -> int:
        return self.num_prefill * (self.prefill_profile.tp_size if self.prefill_profile else 1) + \
            self.num_decode * self.decode_profile.tp_size


@dataclass
class _Trace:
    request: SimRequest
    token_times: list = field(default_factory=list)
    num_cached: int = 0
    handoff: bool = False  # its prompt is done on a prefill worker; decode starts once its first token is sent
    prefilled_on: str = ""  # the worker that computed its prompt for another (a mixed one never decodes it too)


@dataclass(frozen=True)
class SimResult:
    records: tuple[RequestRecord, ...]
    duration_s: float
    placements: dict[str, int]  # reason -> count
    kv_transfers: int
    steps: dict[str, int]  # worker id -> steps run


class Simulator:
    """``view`` None: the router sees every worker's load exactly and at once (for
    hand-computed cases); otherwise as stale as ``RouterView`` makes it."""

    def __init__(self, layout: Layout, view: ViewTiming | None = ViewTiming(), weights: CostWeights = CostWeights()) -> None:
        self.layout = layout
        self.policy = PrefixAwarePolicy(weights)
        prefill_limits = layout.prefill_limits or layout.limits
        self.prefill = [SimWorker(f"prefill-{i}", "prefill", layout.prefill_profile.step_model, prefill_limits)
                        for i in range(layout.num_prefill)]
        self.decode = [SimWorker(f"decode-{i}", "decode", layout.decode_profile.step_model, layout.limits)
                       for i in range(layout.num_decode)]
        self._by_id = {w.worker_id: w for w in (*self.prefill, *self.decode)}
        self.view = RouterView(list(self._by_id), view) if view else None
        if self.view:
            for w in self._by_id.values():
                self.view.publish(w.worker_id, w.load())
            self.view.refresh()
        self._events: list = []
        self._seq = itertools.count()
        self._num_open = 0
        message_us = layout.overheads.router_message_us
        self.loop = RouterLoop(message_us / 1e6) if message_us else None
        self._traces: dict[int, _Trace] = {}
        self._placements: Counter = Counter()
        self._transfers = 0

    # -- event queue --------------------------------------------------------------------

    def _at(self, time_s: float, kind: str, *payload, last: bool = False) -> None:
        """``last``: after every other event of the same instant (a step is composed once
        everything arriving at that instant is in)."""
        heapq.heappush(self._events, (time_s, last, next(self._seq), kind, payload))

    def run(self, requests: Sequence[SimRequest]) -> SimResult:
        if not requests:
            raise ValueError("no requests to simulate")
        for r in requests:
            self._traces[r.index] = _Trace(r)
            self._at(r.arrival_s, "arrive", r)
        self._num_open = len(requests)
        if self.view:
            timing = self.view.timing
            for i, w in enumerate(self._by_id.values()):  # heartbeats out of phase, as independent workers'
                self._at(timing.heartbeat_s * (i + 1) / len(self._by_id), "heartbeat", w)
            self._at(timing.refresh_s, "refresh")
        while self._events:
            now, _, _, kind, payload = heapq.heappop(self._events)
            getattr(self, f"_on_{kind}")(now, *payload)
        records = tuple(self._record(t) for t in self._traces.values())
        duration = max(r.end_time for r in records)
        steps = {w.worker_id: w.num_steps for w in (*self.prefill, *self.decode)}
        return SimResult(records, duration, dict(self._placements), self._transfers, steps)

    # -- routing ------------------------------------------------------------------------

    def _live(self, worker: SimWorker) -> LiveWorker:
        load = self.view.load(worker.worker_id) if self.view else worker.load()
        mixed = worker.role == "decode" and self.layout.mixed
        return LiveWorker(WorkerInfo(worker.worker_id, worker.role, worker.worker_id, worker.limits.block_size,
                                     accepts_prefill=mixed), load)

    def _pick_prefill(self, r: SimRequest, candidates: Sequence[SimWorker] | None = None) -> SimWorker:
        candidates = self.prefill if candidates is None else candidates
        matches = {w.worker_id: r.prefix_len // w.limits.block_size if r.prefix_id in w.cached_prefixes else 0
                   for w in candidates}
        # The first block's hash breaks ties: prompts of one prefix share it, others differ.
        first_block = f"prefix-{r.prefix_id}" if r.prefix_id is not None else f"request-{r.index}"
        decision = self.policy.pick_prefill([first_block.encode()], [self._live(w) for w in candidates],
                                            matches, r.prompt_len)
        return self._by_id[decision.worker_id]

    def _pick_decode(self, r: SimRequest, avoid: str = "") -> SimWorker:
        num_blocks = -(-(r.prompt_len + 1) // self.layout.limits.block_size)
        candidates = [w for w in self.decode if w.worker_id != avoid] or self.decode
        decision = self.policy.pick_decode([self._live(w) for w in candidates], num_blocks, f"sim-{r.index}".encode())
        return self._by_id[decision.worker_id]

    def _prefill_worker(self, r: SimRequest, decode: SimWorker) -> SimWorker | None:
        """Where the prompt is prefilled for ``decode`` to decode it; None: on ``decode`` itself."""
        layout = self.layout
        if not self.prefill and not layout.mixed:
            self._placements["colocated"] += 1
            return None
        if layout.placement == "remote":
            self._placements["remote"] += 1
            return self._pick_prefill(r)
        if layout.placement == "threshold":
            remote = r.prompt_len >= layout.prefill_threshold
            self._placements["threshold_remote" if remote else "threshold_local"] += 1
            return self._pick_prefill(r) if remote else None
        policy = layout.placement_policy
        # As the router's Placer: mixed-role decode workers other than ``decode``, with headroom.
        helpers = [w for w in self.decode if layout.mixed and w is not decode and policy.has_headroom(self._live(w), r.prompt_len)]
        candidates = [*self.prefill, *helpers]
        prefill = self._pick_prefill(r, candidates) if candidates else None
        state = PlacementState(r.prompt_len, self._live(prefill) if prefill else None, self._live(decode))
        decision = policy.decide(state)
        self._placements[f"{decision.where}:{decision.reason}"] += 1
        return None if decision.where == "local" else prefill

    # -- events -------------------------------------------------------------------------

    def _on_heartbeat(self, now: float, worker: SimWorker) -> None:
        self.view.publish(worker.worker_id, worker.load())
        if self._num_open:
            self._at(now + self.view.timing.heartbeat_s, "heartbeat", worker)

    def _on_refresh(self, now: float) -> None:
        self.view.refresh()
        if self._num_open:
            self._at(now + self.view.timing.refresh_s, "refresh")

    def _track(self, worker: SimWorker, job: Job, sign: int) -> None:
        if self.view is None:
            return
        if job.prefill_only:
            self.view.track(worker.worker_id, num_tokens=job.prompt_len, sign=sign)
        else:
            self.view.track(worker.worker_id, num_blocks=-(-(job.prompt_len + 1) // worker.limits.block_size), sign=sign)

    def _on_arrive(self, now: float, r: SimRequest) -> None:
        if self.loop is None:
            self._place(now, r)
            return
        self._loop_at(self.loop.admit(r.index, now))

    def _loop_at(self, time_s: float | None) -> None:
        if time_s is not None:
            self._at(time_s, "loop")

    def _on_loop(self, now: float) -> None:
        served, next_at = self.loop.finish(now)
        self._loop_at(next_at)
        trace = self._traces[served.request_id]
        if served.kind == "admit":
            self._place(now, trace.request)
            return
        self._sent(now, trace, served.num_tokens)

    def _sent(self, now: float, trace: _Trace, num_tokens: int) -> None:
        """``num_tokens`` of the request's tokens leave the router for its client at ``now``."""
        trace.token_times.extend([now + self.layout.overheads.stream_ms / 1e3] * num_tokens)
        if trace.handoff:
            trace.handoff = False
            self._start_transfer(now, trace.request, trace.prefilled_on)

    def _place(self, now: float, r: SimRequest) -> None:
        decode = self._pick_decode(r)
        hop = self.layout.overheads.dispatch_ms / 1e3
        prefill = self._prefill_worker(r, decode)
        if prefill is not None:
            job = Job(r.index, r.prompt_len, r.prompt_len + 1, prefix_id=r.prefix_id, prefix_len=r.prefix_len, prefill_only=True)
            self._track(prefill, job, +1)
            self._at(now + hop, "deliver", prefill, job)
        else:
            job = Job(r.index, r.prompt_len, r.prompt_len + r.output_len, prefix_id=r.prefix_id, prefix_len=r.prefix_len)
            self._at(now + hop, "deliver", decode, job)

    def _on_deliver(self, now: float, worker: SimWorker, job: Job) -> None:
        worker.add(job)
        self._traces[job.request_id].num_cached = max(self._traces[job.request_id].num_cached, job.num_computed)
        self._wake(now, worker)

    def _wake(self, now: float, worker: SimWorker) -> None:
        if not worker.stepping and not worker.composing:
            worker.composing = True
            self._at(now, "compose", worker, last=True)

    def _on_compose(self, now: float, worker: SimWorker) -> None:
        worker.composing = False
        result = worker.step()
        if result is None:
            return
        worker.stepping = True
        self._at(now + result.duration_s, "step_end", worker, result)

    def _on_step_end(self, now: float, worker: SimWorker, result) -> None:
        worker.stepping = False
        for job in result.finished:
            trace = self._traces[job.request_id]
            self._track(worker, job, -1)
            if job.prefill_only and trace.request.output_len > 1:
                trace.handoff = True  # the router opens the decode side after sending the first token
                trace.prefilled_on = worker.worker_id
            else:
                self._num_open -= 1
        for job in result.sampled:
            if self.loop is None:
                self._sent(now, self._traces[job.request_id], 1)
            else:
                self._loop_at(self.loop.token(job.request_id, now))
            if not job.prefill_only and not job.tracked:
                job.tracked = True  # the router counts it from its first decode token
                self._track(worker, job, +1)
        self._wake(now, worker)

    def _start_transfer(self, now: float, r: SimRequest, prefilled_on: str) -> None:
        decode = self._pick_decode(r, avoid=prefilled_on)
        profile = self.layout.decode_profile
        transfer = profile.transfer_model.transfer_ms(profile.kv_bytes(r.prompt_len)) / 1e3
        self._transfers += 1
        moved = Job(r.index, r.prompt_len, r.prompt_len + r.output_len, num_computed=r.prompt_len, num_generated=1)
        self._at(now + self.layout.overheads.dispatch_ms / 1e3 + transfer, "landed", decode, moved)

    def _on_landed(self, now: float, worker: SimWorker, job: Job) -> None:
        worker.add(job)  # its KV is here: it only needs slots and decode steps
        self._wake(now, worker)

    # -- results ------------------------------------------------------------------------

    def _record(self, trace: _Trace) -> RequestRecord:
        r, times = trace.request, tuple(trace.token_times)
        if len(times) != r.output_len:
            raise RuntimeError(f"request {r.index} got {len(times)} of {r.output_len} tokens: the simulation lost it")
        return RequestRecord(
            index=r.index, request_id=f"sim-{r.index}", send_time=r.arrival_s, chunk_times=times,
            chunk_num_tokens=(1,) * len(times), end_time=times[-1], prompt_len=r.prompt_len,
            max_tokens=r.output_len, usage=Usage(r.prompt_len, r.output_len, trace.num_cached),
            finish_reason="length", error_code=None,
        )
