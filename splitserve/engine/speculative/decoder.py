"""The engine's side of speculative decoding: who gets proposals, and what a checked step yields.

Each step, before scheduling, requests that are decoding get up to K proposed tokens
(``Request.spec_token_ids``); the scheduler puts them after the request's newest token, so the
target computes 1 + K positions of the request in one step and returns logits for all of them.
``verify`` keeps the accepted prefix and one token drawn by the target; the KV of the accepted
proposals is kept (they count as computed) and the blocks past the request's new length are
given back (``KVCacheManager.trim``): rejected slots never outlive the step.

Requests the device sampler cannot serve (penalties, logprobs, a seed, a logit bias) get no
proposals and are sampled as before, in the same step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.config import SpeculativeConfig
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.request import Request
from splitserve.engine.sampler import Sampler
from splitserve.engine.scheduler import Scheduler, SchedulerOutput
from splitserve.engine.speculative.ngram import NgramProposer
from splitserve.engine.speculative.rejection import verify


@dataclass(frozen=True)
class SpecStats:
    num_verifications: int = 0  # request-steps that checked at least one proposed token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a checking step yields per request: accepted proposals plus the target's own."""
        return 1.0 + self.num_accepted_tokens / self.num_verifications if self.num_verifications else 0.0


class SpeculativeDecoder:
    def __init__(self, config: SpeculativeConfig, runner, kv: KVCacheManager) -> None:
        self.num_speculative_tokens = config.num_speculative_tokens
        self.kv = kv
        self.ngram = NgramProposer(config.ngram_min, config.ngram_max) if config.method == "ngram" else None
        self.draft = None
        if config.method == "draft":
            from splitserve.engine.speculative.draft import DraftProposer

            self.draft = DraftProposer(config.draft_model, runner)
        self.stats = SpecStats()

    def propose(self, scheduler: Scheduler) -> None:
        """Sets the proposals of the running requests that are decoding."""
        candidates, room = [], []
        for request in scheduler.running:
            request.spec_token_ids = []
            if request.num_tokens - request.num_computed_tokens != 1 or not Sampler.samples_on_device([request]):
                continue
            k = min(
                self.num_speculative_tokens,
                request.sampling_params.max_tokens - request.num_output_tokens - 1,
                scheduler.max_model_len - request.num_tokens - 1,
            )
            if k > 0:
                candidates.append(request)
                room.append(k)
        if self.ngram is not None:
            for request, k in zip(candidates, room):
                request.spec_token_ids = self.ngram.propose(request.all_token_ids, k)
            return
        # The draft writes KV for its proposals: the slots must be the request's before it runs.
        room = [k if self.kv.allocate_slots(r, 1 + k) is not None else 0 for r, k in zip(candidates, room)]
        self.draft.forget_except(scheduler.requests)
        block_ids = [self.kv.get_block_ids(r.request_id) for r in candidates]
        budget = scheduler.config.max_num_batched_tokens
        for request, proposal in zip(candidates, self.draft.propose(candidates, block_ids, room, budget)):
            request.spec_token_ids = proposal

    def sample(
        self, scheduler: Scheduler, out: SchedulerOutput, logits: torch.Tensor, sampler: Sampler
    ) -> list[tuple[Request, list[int], list]]:
        """Samples the step (``logits``: 1 + num_spec rows per sampling request), appends the tokens,
        finishes who stopped, trims rejected slots. Returns (request, new tokens, their logprobs)."""
        scheduled = [s for s in out.scheduled if s.sample]
        requests = [scheduler.requests[s.request_id] for s in scheduled]
        starts = [0]
        for s in scheduled:
            starts.append(starts[-1] + 1 + s.num_spec)
        on_device = [i for i, r in enumerate(requests) if Sampler.samples_on_device([r])]
        on_host = [i for i, r in enumerate(requests) if i not in set(on_device)]
        new: dict[int, tuple[list[int], list]] = {}
        if on_device:
            rows = [row for i in on_device for row in range(starts[i], starts[i + 1])]
            proposals = [scheduled[i].token_ids[len(scheduled[i].token_ids) - scheduled[i].num_spec :] for i in on_device]
            picked = logits[torch.tensor(rows, device=logits.device)] if len(rows) < logits.shape[0] else logits
            results = verify(picked, [requests[i] for i in on_device], proposals, sampler.device_generator(logits.device))
            for i, result in zip(on_device, results):
                new[i] = (result.token_ids, [])
                if result.num_proposed:
                    self.stats = SpecStats(
                        self.stats.num_verifications + 1,
                        self.stats.num_draft_tokens + result.num_proposed,
                        self.stats.num_accepted_tokens + result.num_accepted,
                    )
                    if self.draft is not None:
                        self.draft.accepted(requests[i], result.num_accepted, result.num_proposed)
        if on_host:
            rows = [starts[i] for i in on_host]  # no proposals: one row each
            sampled = sampler(logits[torch.tensor(rows, device=logits.device)], [requests[i] for i in on_host])
            for i, (token_id, logprob) in zip(on_host, sampled):
                new[i] = ([token_id], [logprob] if logprob is not None else [])
        return commit(scheduler, self.kv, out, [(requests[i], *new[i]) for i in range(len(requests))])


def commit(
    scheduler: Scheduler, kv: KVCacheManager, out: SchedulerOutput, new: list[tuple[Request, list[int], list]]
) -> list[tuple[Request, list[int], list]]:
    """Lands a step whose sampling requests got ``new`` = (request, tokens, logprobs): progress
    moves on by what was computed (and the accepted proposals), tokens are appended up to a
    stop, and blocks past each request's new length are given back."""
    scheduler.advance(out)
    emitted = []
    for request, tokens, logprobs in new:
        if request.is_finished:
            continue  # aborted while the step ran
        kept = []
        for j, token_id in enumerate(tokens):
            request.append_output(token_id, logprobs[j] if logprobs else None)
            kept.append(token_id)
            if scheduler.check_finished(request):
                break
        if not request.is_finished and len(tokens) > 1:
            # The accepted proposals' KV was computed this step; the newest token's is not yet.
            request.num_computed_tokens = request.num_tokens - 1
            kv.cache_blocks(request)
        if not request.is_finished:
            kv.trim(request, request.num_tokens)
        request.spec_token_ids = []
        emitted.append((request, kept, logprobs[: len(kept)]))
    return emitted
