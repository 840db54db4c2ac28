"""Per-request placement: prefill on a prefill worker and move the KV ("remote"), or prefill
on the decode worker inside its running batch ("local").

For each choice the policy estimates, from the workers' last reported load and the
profile's step model (``splitserve.profile``):

  remote  TTFT = the prefill worker's queued prompt tokens plus this prompt, in chunks of
          its token budget; the decode worker's step then grows by one row, and this
          request's first gap there is the KV transfer plus that step.
  local   TTFT = the decode worker's queued prompt tokens plus this prompt, in chunks of
          what its budget leaves beside the running rows; every one of those steps carries
          the running batch, so each running request's inter-token gap is that step.

A decode worker in a mixed role (``--accept-prefill``) may stand in for a prefill worker
("mixed"): it prefills the prompt in its own steps, beside its own running batch, and the
chosen decode worker pulls the KV from it. It is a candidate only with headroom
(``has_headroom``): its own TTFT and ITL estimates for taking the prompt, as ``local``
prices them on it, both inside the SLOs, and the prompt's blocks free. Its remote TTFT is
priced the same way, not as an idle prefill worker's.

Each estimate is set against the SLOs (TTFT, and ITL: the longest gap a running request
may see, this one included); a choice's headroom on a metric is 1 - estimate/SLO. The
choice whose smaller headroom is larger wins; equal smaller headrooms go to the larger
other one, and a full tie to remote (it keeps decode steps short). The reason names the
metric that decided (``ttft`` or ``itl``: where the loser's headroom fell short), or
``no_prefill_worker``; decisions are counted by choice and reason.

``PlacementPolicy`` is pure and synchronous, like ``routing.py``: the simulator runs the
same code on its simulated workers' load. ``Placer`` is the router's async side.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter

from splitserve.controlplane.types import LiveWorker
from splitserve.profile.schema import Profile
from splitserve.profile.step_model import causal_pairs
from splitserve.services.router.routing import RoutingPolicy

if TYPE_CHECKING:  # the simulator imports this module without the router's gRPC side
    from splitserve.services.router.workers import WorkerDirectory

WHERE = ("remote", "mixed", "local")
REASONS = ("no_prefill_worker", "ttft", "itl")


@dataclass(frozen=True)
class PlacementSLO:
    ttft_ms: float
    itl_ms: float

    def __post_init__(self) -> None:
        if not (self.ttft_ms > 0 and self.itl_ms > 0):
            raise ValueError(f"placement SLOs must be positive, got {self}")


def parse_slo(text: str) -> PlacementSLO:
    """``"ttft:500,itl:50"`` -> PlacementSLO(500.0, 50.0)."""
    try:
        values = dict(pair.split(":", 1) for pair in text.split(","))
        if set(values) != {"ttft", "itl"}:
            raise ValueError
        return PlacementSLO(float(values["ttft"]), float(values["itl"]))
    except ValueError:
        raise ValueError(f"placement SLOs must read ttft:MS,itl:MS with positive numbers, got {text!r}") from None


@dataclass(frozen=True)
class PlacementState:
    """What the router knows when it places one request."""

    prompt_len: int  # tokens to prefill
    prefill: LiveWorker | None  # the prefill worker the routing policy would pick; None: none live
    decode: LiveWorker  # the decode worker the routing policy would pick


@dataclass(frozen=True)
class Estimate:
    ttft_ms: float
    itl_ms: float  # the longest gap the decode worker's running requests (or this one) would see

    def headroom(self, slo: PlacementSLO) -> list[tuple[float, str]]:
        """[(headroom, metric)], the smaller first."""
        return sorted([(1 - self.ttft_ms / slo.ttft_ms, "ttft"), (1 - self.itl_ms / slo.itl_ms, "itl")])


@dataclass(frozen=True)
class Placement:
    where: str  # "remote" | "local"
    reason: str
    remote: Estimate | None
    local: Estimate


@dataclass(frozen=True)
class EngineBudget:
    """The workers' scheduler limits (the same flags every worker of a pool runs with)."""

    max_num_batched_tokens: int = 8192
    block_size: int = 16


class PlacementPolicy:
    def __init__(self, prefill_profile: Profile, decode_profile: Profile, slo: PlacementSLO,
                 prefill_budget: EngineBudget = EngineBudget(), decode_budget: EngineBudget = EngineBudget()) -> None:
        self.prefill_model = prefill_profile.step_model
        self.decode_model = decode_profile.step_model
        self.decode_profile = decode_profile
        self.slo = slo
        self.prefill_budget = prefill_budget
        self.decode_budget = decode_budget

    def _context_tokens(self, worker: LiveWorker) -> int:
        """KV tokens in use: what a decode step's attention reads, as the blocks report it."""
        return (worker.load.num_total_blocks - worker.load.num_free_blocks) * worker.info.block_size

    def _prefill_ms(self, num_tokens: int, chunk: int) -> float:
        """A prefill worker's time for ``num_tokens`` queued prompt tokens in ``chunk``-token steps."""
        total, done = 0.0, 0
        while done < num_tokens:
            n = min(chunk, num_tokens - done)
            total += self.prefill_model.step_ms(n, 1, n, causal_pairs(n, 0))
            done += n
        return total

    def has_headroom(self, helper: LiveWorker, prompt_len: int) -> bool:
        """Whether a mixed-role decode worker can prefill ``prompt_len`` tokens for another
        decode worker and still keep its own requests (and this prompt's TTFT) inside the SLOs."""
        if not helper.info.accepts_prefill:
            return False
        blocks = -(-(prompt_len + 1) // helper.info.block_size)
        if blocks > helper.load.num_free_blocks:
            return False
        own = self.estimate_local(PlacementState(prompt_len, None, helper))
        return all(h > 0 for h, _ in own.headroom(self.slo))

    def estimate_remote(self, state: PlacementState) -> Estimate:
        if state.prefill.info.accepts_prefill:  # a mixed worker: its prompt chunks share steps with its own batch
            ttft = self.estimate_local(PlacementState(state.prompt_len, None, state.prefill)).ttft_ms
        else:
            queued = state.prefill.load.num_tokens_in_flight + state.prompt_len
            ttft = self._prefill_ms(queued, self.prefill_budget.max_num_batched_tokens)
        rows = state.decode.load.num_running + state.decode.load.num_waiting + 1
        step = self.decode_model.step_ms(rows, rows, self._context_tokens(state.decode) + state.prompt_len, 0)
        transfer = self.decode_profile.transfer_model.transfer_ms(self.decode_profile.kv_bytes(state.prompt_len))
        return Estimate(ttft, max(step, transfer + step))

    def estimate_local(self, state: PlacementState) -> Estimate:
        load = state.decode.load
        rows = load.num_running + load.num_waiting  # the waiting join the batch before this prompt's chunks
        chunk = max(self.decode_budget.max_num_batched_tokens - rows, 1)
        queued = load.num_tokens_in_flight + state.prompt_len
        context = self._context_tokens(state.decode)
        ttft, longest, done = 0.0, 0.0, 0
        while done < queued:
            n = min(chunk, queued - done)
            step = self.decode_model.step_ms(rows + n, rows + 1, context + done + n, causal_pairs(n, done))
            ttft += step
            longest = max(longest, step)
            done += n
        # This request's own gaps after its first token: decode steps beside the others.
        own = self.decode_model.step_ms(rows + 1, rows + 1, context + queued, 0)
        return Estimate(ttft, max(longest, own) if rows else own)

    def decide(self, state: PlacementState) -> Placement:
        local = self.estimate_local(state)
        if state.prefill is None:
            return Placement("local", "no_prefill_worker", None, local)
        remote = self.estimate_remote(state)
        remote_room, local_room = remote.headroom(self.slo), local.headroom(self.slo)
        if [h for h, _ in local_room] > [h for h, _ in remote_room]:
            return Placement("local", _deciding(remote_room, local_room), remote, local)
        where = "mixed" if state.prefill.info.accepts_prefill else "remote"
        return Placement(where, _deciding(local_room, remote_room), remote, local)


def _deciding(loser: list[tuple[float, str]], winner: list[tuple[float, str]]) -> str:
    """The metric on which the losing choice fell short: its smaller headroom's, unless that
    tied the winner's smaller one and the second decided."""
    if loser[0][0] < winner[0][0]:
        return loser[0][1]
    return loser[1][1]


class Placer:
    """The router's side: asks the routing policy which prefill and decode worker each choice
    would use, decides, and counts the decision (``splitserve_placements_total``)."""

    def __init__(self, policy: PlacementPolicy, registry: CollectorRegistry) -> None:
        self.policy = policy
        self.decisions = Counter("splitserve_placements", "Per-request placement: where the prompt was prefilled, and why",
                                 ["where", "reason"], registry=registry)

    @classmethod
    def from_files(cls, prefill_profile: Path, decode_profile: Path, slo: PlacementSLO, budget: EngineBudget,
                   registry: CollectorRegistry) -> Placer:
        decode = Profile.load(decode_profile)
        prefill = Profile.load(prefill_profile) if prefill_profile != decode_profile else decode
        return cls(PlacementPolicy(prefill, decode, slo, budget, budget), registry)

    async def place(self, workers: WorkerDirectory, routing: RoutingPolicy, block_hashes: Sequence[bytes],
                    num_prompt_tokens: int, request_id: str) -> list[LiveWorker] | None:
        """None: prefill on the decode worker. Otherwise the workers to prefill on, in the
        routing policy's hands: the prefill workers, and the mixed one placement chose, if
        any. With no live decode worker it says remote and leaves the error to the decode path."""
        decode_candidates = await workers.live("decode")
        prefill_workers = await workers.live("prefill")
        if not decode_candidates:
            return prefill_workers
        num_blocks = -(-(num_prompt_tokens + 1) // decode_candidates[0].info.block_size)
        picked = routing.pick_decode(decode_candidates, num_blocks, request_id.encode())
        decode = next(w for w in decode_candidates if w.info.worker_id == picked.worker_id)
        # Mixed-role decode workers other than the one decoding, only while they have headroom.
        helpers = [w for w in decode_candidates if w is not decode and self.policy.has_headroom(w, num_prompt_tokens)]
        prefill = None
        prefill_candidates = prefill_workers + helpers
        if prefill_candidates:
            tiers = await workers.match_prefix_tiers(block_hashes, prefill_candidates)
            matches, host_matches = tiers if tiers is not None else (None, None)
            chosen = routing.pick_prefill(block_hashes, prefill_candidates, matches, num_prompt_tokens, host_matches)
            prefill = next(w for w in prefill_candidates if w.info.worker_id == chosen.worker_id)
            num_prompt_tokens -= chosen.num_cached_tokens
        placement = self.policy.decide(PlacementState(max(num_prompt_tokens, 1), prefill, decode))
        self.decisions.labels(placement.where, placement.reason).inc()
        if placement.where == "local":
            return None
        # The chosen worker first; the prefill workers stay behind it for a retry.
        return [prefill, *(w for w in prefill_workers if w is not prefill)]
