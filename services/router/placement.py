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

Each estimate is set against the SLOs (TTFT, and ITL: the longest gap a running request
may see, this one included); a choice's headroom on a metric is 1 - estimate/SLO. The
choice whose smaller headroom is larger wins; equal smaller headrooms go to the larger
other one, and a full tie to remote (it keeps decode steps short). The reason names the
metric that decided (``ttft`` or ``itl``: where the loser's headroom fell short), or
``no_prefill_worker``; decisions are counted by choice and reason.

Pure and synchronous, like ``routing.py``: the simulator runs the same code on its
simulated workers' load.
"""
from __future__ import annotations

from dataclasses import dataclass

from splitserve.controlplane.types import LiveWorker
from splitserve.profile.schema import Profile
from splitserve.profile.step_model import causal_pairs

WHERE = ("remote", "local")
REASONS = ("no_prefill_worker", "ttft", "itl")


@dataclass(frozen=True)
class PlacementSLO:
    ttft_ms: float
    itl_ms: float

    def __post_init__(self) -> None:
        if not (self.ttft_ms > 0 and self.itl_ms > 0):
            raise ValueError(f"placement SLOs must be positive, got {self}")


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

    def estimate_remote(self, state: PlacementState) -> Estimate:
        queued = state.prefill.load.num_tokens_in_flight + state.prompt_len
        ttft = self._prefill_ms(queued, self.prefill_budget.max_num_batched_tokens)
        rows = state.decode.load.num_running + 1
        step = self.decode_model.step_ms(rows, rows, self._context_tokens(state.decode) + state.prompt_len, 0)
        transfer = self.decode_profile.transfer_model.transfer_ms(self.decode_profile.kv_bytes(state.prompt_len))
        return Estimate(ttft, max(step, transfer + step))

    def estimate_local(self, state: PlacementState) -> Estimate:
        load = state.decode.load
        rows = load.num_running
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
        return Placement("remote", _deciding(local_room, remote_room), remote, local)


def _deciding(loser: list[tuple[float, str]], winner: list[tuple[float, str]]) -> str:
    """The metric on which the losing choice fell short: its smaller headroom's, unless that
    tied the winner's smaller one and the second decided."""
    if loser[0][0] < winner[0][0]:
        return loser[0][1]
    return loser[1][1]
