"""A draft model proposes tokens: a smaller checkpoint with the target's vocabulary.

The draft has a paged KV cache of its own, as many blocks as the target's and addressed by the
same block ids, so a request's block table serves both models and no second allocator exists.
Its KV is built lazily: before proposing, the draft computes every token of the request it has
not seen (all of them the first time, whether the target prefilled the prompt here or loaded
its KV from a prefill worker), then proposes greedily, one token per forward, the proposals
staying on the device until the last one is read. A request whose blocks changed (preempted
and rescheduled) is rebuilt from position 0.
"""
from __future__ import annotations

from dataclasses import dataclass

from splitserve.config import CacheConfig, ConfigError, ModelConfig
from splitserve.engine.model_runner import ModelRunner, Placeholders
from splitserve.engine.request import PLACEHOLDER, Request
from splitserve.engine.scheduler import ScheduledRequest, SchedulerOutput


@dataclass
class _DraftState:
    num_computed: int  # positions whose draft KV is in the request's blocks
    block_ids: list[int]  # the blocks that KV is in


class DraftProposer:
    def __init__(self, draft_dir, target: ModelRunner) -> None:
        model = ModelConfig(draft_dir, dtype=target.dtype, device=str(target.device), max_model_len=target.max_model_len)
        self.runner = ModelRunner(model, CacheConfig(block_size=target.block_size, num_blocks=target.num_blocks))
        if self.runner.arch.vocab_size != target.arch.vocab_size:
            raise ConfigError(
                f"draft model: vocabulary of {self.runner.arch.vocab_size} tokens, the target's has {target.arch.vocab_size}"
            )
        self.block_size = target.block_size
        self._state: dict[str, _DraftState] = {}

    def propose(
        self, requests: list[Request], block_ids: list[list[int]], num_tokens: list[int], budget: int
    ) -> list[list[int]]:
        """Greedy proposals of ``num_tokens[i]`` tokens for ``requests[i]`` (each decoding: its newest
        token not yet computed by the target), whose blocks ``block_ids[i]`` have room for them.

        The draft computes at most ``budget`` tokens of context this step: a request whose draft
        KV is further behind (a long prompt that arrived as KV) catches up over several steps
        and gets no proposal until it has."""
        scheduled, batch = [], []  # batch: the requests that propose, in the order of their logits rows
        for request, blocks, n in zip(requests, block_ids, num_tokens):
            if n <= 0:
                continue
            start = self._valid_prefix(request, blocks)
            chunk = min(request.num_tokens - start, budget)
            if chunk <= 0:
                break
            budget -= chunk
            ready = start + chunk == request.num_tokens
            scheduled.append(ScheduledRequest(request.request_id, request.all_token_ids[start : start + chunk], start, blocks, sample=ready))
            if ready:
                batch.append((request, blocks, n))
            else:
                self._state[request.request_id] = _DraftState(start + chunk, list(blocks))
        if not scheduled:
            return [[] for _ in requests]
        logits = self.runner.execute(SchedulerOutput(scheduled))
        if not batch:
            return [[] for _ in requests]
        # Forward j proposes token j of the requests that want more than j; rows[j] maps a request to its row.
        drafts = [logits.argmax(dim=-1)]
        live = list(range(len(batch)))
        rows = [{i: i for i in live}]
        for j in range(1, max(n for _, _, n in batch)):
            live = [i for i in live if batch[i][2] > j]
            out = SchedulerOutput(
                [
                    ScheduledRequest(batch[i][0].request_id, [PLACEHOLDER], batch[i][0].num_tokens + j - 1, batch[i][1], sample=True)
                    for i in live
                ]
            )
            placeholders = Placeholders(drafts[-1], [rows[-1][i] for i in live])
            drafts.append(self.runner.execute(out, placeholders).argmax(dim=-1))
            rows.append({i: row for row, i in enumerate(live)})
        host = [t.tolist() for t in drafts]  # the one wait
        proposals: dict[str, list[int]] = {}
        for i, (request, blocks, n) in enumerate(batch):
            proposals[request.request_id] = [host[j][rows[j][i]] for j in range(n)]
            # Draft KV now covers the context; proposed tokens' KV counts once accepted (``accepted``).
            self._state[request.request_id] = _DraftState(request.num_tokens, list(blocks))
        return [proposals.get(r.request_id, []) for r in requests]

    def accepted(self, request: Request, num_accepted: int, num_proposed: int) -> None:
        """The first ``num_accepted`` proposals were kept: the draft KV of those it computed stays valid."""
        state = self._state.get(request.request_id)
        if state is not None:
            state.num_computed += min(num_accepted, num_proposed - 1)

    def _valid_prefix(self, request: Request, blocks: list[int]) -> int:
        state = self._state.get(request.request_id)
        if state is None:
            return 0
        num_blocks = -(-state.num_computed // self.block_size)
        if blocks[:num_blocks] != state.block_ids[:num_blocks]:
            return 0  # preempted and given other blocks: rebuild
        return min(state.num_computed, request.num_tokens - 1)

    def forget_except(self, request_ids) -> None:
        """Drops the state of requests that are gone (finished, aborted)."""
        for request_id in [r for r in self._state if r not in request_ids]:
            del self._state[request_id]
