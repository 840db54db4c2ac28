"""Continuous batching in tokens: who runs this step, how many tokens each, and who is preempted.

Every step the scheduler hands out a token budget. Running requests go first
(one token each when decoding, a chunk when still prefilling), then waiting
ones join while budget, sequence slots and KV blocks last. When blocks run
out, the newest running request is preempted: its blocks are freed and it is
recomputed later (prefix-cache hits make that cheap). Nothing here touches a device.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from splitserve.config import SchedulerConfig
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.request import FinishReason, Request, RequestStatus, TokenLogprob


@dataclass(frozen=True)
class ScheduledRequest:
    request_id: str
    token_ids: list[int]  # the tokens to compute this step
    start_pos: int  # position of token_ids[0] == num_computed_tokens before the step
    block_ids: list[int]  # the request's whole block table
    sample: bool  # this step reaches the end of the request's tokens: sample the next one
    all_rows: bool = False  # logits for every token of this step, not only the last (prompt logprobs)
    num_spec: int = 0  # the last num_spec token_ids are proposed tokens: logits for them and the token before

    @property
    def num_computed(self) -> int:
        """Tokens this step surely computes (proposed ones count only once they are accepted)."""
        return len(self.token_ids) - self.num_spec


@dataclass(frozen=True)
class KVLoad:
    """Blocks the decode side allocated for KV that another worker computed."""

    request_id: str
    local_block_ids: list[int]
    remote_block_ids: list[int]
    num_tokens: int  # tokens the remote KV covers, counted from position 0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    kv_loads: list[KVLoad] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)


@dataclass(frozen=True)
class RemoteKV:
    """Where the prompt's KV already is: the remote blocks, holding ``num_tokens`` tokens."""

    block_ids: list[int]
    num_tokens: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv_cache_manager
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.remote_kv: dict[str, RemoteKV] = {}  # waiting requests whose KV comes from elsewhere
        self.loading: dict[str, Request] = {}  # blocks allocated, KV transfer under way
        self.held: dict[str, Request] = {}  # finished, blocks kept for another worker to read
        self.hold_kv: set[str] = set()
        self.num_preemptions = 0
        self.num_prompt_tokens_computed = 0
        self.num_prefix_hit_tokens = 0

    # -- requests in and out -------------------------------------------------

    def add_request(self, request: Request, remote_kv: RemoteKV | None = None, hold_kv: bool = False) -> None:
        self.requests[request.request_id] = request
        if remote_kv is not None:
            self.remote_kv[request.request_id] = remote_kv
        if hold_kv:
            self.hold_kv.add(request.request_id)
        self.waiting.append(request)

    def finish_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> Request | None:
        """Ends a request wherever it is and frees its blocks (held ones included)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request in self.running:
            self.running.remove(request)
        elif request_id in self.loading:
            del self.loading[request_id]
        elif request_id in self.held:
            del self.held[request_id]
        elif request in self.waiting:
            self.waiting.remove(request)
        self.remote_kv.pop(request_id, None)
        self.hold_kv.discard(request_id)
        request.status, request.finish_reason = RequestStatus.FINISHED, request.finish_reason or reason
        self.kv.free(request)
        return request

    def finish_kv_load(self, request_id: str, ok: bool, quarantine: frozenset[int] = frozenset()) -> None:
        """The transfer for a loading request ended: join the running batch, or prefill here.

        ``quarantine``: local blocks a failed transfer may still write into; they are
        kept from reuse until ``KVCacheManager.free_quarantined``.
        """
        request = self.loading.pop(request_id, None)
        if request is None:
            return  # aborted meanwhile
        if ok:
            request.num_computed_tokens = request.num_prompt_tokens
            self.kv.cache_blocks(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
        else:
            self.kv.free(request, quarantine)
            request.num_computed_tokens = 0
            request.status = RequestStatus.WAITING
            self.waiting.appendleft(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.loading)

    # -- one step ------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, int] = {}
        num_spec: dict[str, int] = {}

        preempted: set[str] = set()
        for request in list(self.running):
            if request.request_id in preempted:
                continue  # preempted to make room for an earlier request this step
            if request.num_pending_tokens and request.length_reached(self.max_model_len):
                continue  # its token in flight is its last: it finishes when that arrives
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:
                continue
            num_spec[request.request_id] = self._num_spec(request, num_new, budget)
            while self.kv.allocate_slots(request, num_new + num_spec[request.request_id]) is None:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.add(victim.request_id)
                out.preempted_ids.append(victim.request_id)
                scheduled.pop(victim.request_id, None)
                if victim is request:
                    break
            else:
                scheduled[request.request_id] = num_new
                budget -= num_new + num_spec[request.request_id]

        while self.waiting and budget > 0 and not out.preempted_ids:
            if len(self.running) + len(self.loading) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            hits, num_hit_tokens = self.kv.get_computed_blocks(request)
            if request.sampling_params.prompt_logprobs is not None and request.request_id not in self.remote_kv:
                hits, num_hit_tokens = [], 0  # a cached prompt is never computed here: its logprobs would be missing
            remote = self.remote_kv.get(request.request_id)
            if remote is not None:
                # Blocks for the remote KV are allocated now and filled by the transfer.
                num_hit_tokens = min(num_hit_tokens, remote.num_tokens // self.kv.block_size * self.kv.block_size)
                hits = hits[: num_hit_tokens // self.kv.block_size]
                num_new = remote.num_tokens - num_hit_tokens
            else:
                num_new = min(request.num_tokens - num_hit_tokens, budget)
            if self.kv.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_hit_tokens
                self.num_prefix_hit_tokens += num_hit_tokens
            if remote is not None:
                del self.remote_kv[request.request_id]
                out.kv_loads.append(self._kv_load(request, remote, num_hit_tokens))
                request.status = RequestStatus.WAITING_FOR_REMOTE_KV
                self.loading[request.request_id] = request
                continue
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled[request.request_id] = num_new
            budget -= num_new

        for request_id, num_new in scheduled.items():
            request = self.requests[request_id]
            start = request.num_computed_tokens
            spec = request.spec_token_ids[: num_spec.get(request_id, 0)]
            if start < request.num_prompt_tokens:
                self.num_prompt_tokens_computed += min(num_new, request.num_prompt_tokens - start)
            out.scheduled.append(
                ScheduledRequest(
                    request_id=request_id,
                    token_ids=request.all_token_ids[start : start + num_new] + spec,
                    start_pos=start,
                    block_ids=self.kv.get_block_ids(request_id),
                    sample=start + num_new == request.num_tokens,
                    all_rows=request.sampling_params.prompt_logprobs is not None
                    and len(request.prompt_logprobs) < request.num_prompt_tokens - 1 and start < request.num_prompt_tokens - 1,
                    num_spec=len(spec),
                )
            )
        return out

    def _num_spec(self, request: Request, num_new: int, budget: int) -> int:
        """How many of the request's proposed tokens this step checks: only when it computes its
        newest token, within the token budget, and never more than could still be emitted."""
        if not request.spec_token_ids or num_new != request.num_tokens - request.num_computed_tokens:
            return 0
        room = min(
            budget - num_new,
            request.sampling_params.max_tokens - request.num_output_tokens - 1,
            self.max_model_len - request.num_tokens - 1,
        )
        return max(0, min(len(request.spec_token_ids), room))

    def _kv_load(self, request: Request, remote: RemoteKV, num_hit_tokens: int) -> KVLoad:
        first = num_hit_tokens // self.kv.block_size
        num_blocks = self.kv.num_blocks_for(remote.num_tokens)
        return KVLoad(
            request_id=request.request_id,
            local_block_ids=self.kv.get_block_ids(request.request_id)[first:num_blocks],
            remote_block_ids=list(remote.block_ids[first:num_blocks]),
            num_tokens=remote.num_tokens,
        )

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, tuple[int, TokenLogprob | None]]) -> None:
        """Advances progress by what was computed, appends sampled tokens, finishes who stopped."""
        self.advance(out)
        for s in out.scheduled:
            request = self.requests.get(s.request_id)
            if request is not None and s.request_id in sampled:
                request.append_output(*sampled[s.request_id])
                self.check_finished(request)

    def advance(self, out: SchedulerOutput) -> None:
        """The step's tokens are computed (or queued on the device to be): progress moves on."""
        for s in out.scheduled:
            request = self.requests.get(s.request_id)
            if request is None:
                continue  # aborted while the step ran
            request.num_computed_tokens += s.num_computed
            self.kv.cache_blocks(request)

    def check_finished(self, request: Request) -> bool:
        """Whether the newest output token ends ``request``; if so it is finished (or held)."""
        reason = request.check_stop(self.max_model_len)
        if reason is None:
            return False
        request.finish_reason = reason
        if request.request_id in self.hold_kv:
            self._hold(request)
        else:
            self.finish_request(request.request_id, reason)
        return True

    def _hold(self, request: Request) -> None:
        """Finished, but its blocks stay pinned until ``finish_request`` releases them."""
        self.running.remove(request)
        request.status = RequestStatus.FINISHED
        self.held[request.request_id] = request
