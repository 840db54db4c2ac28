"""A request as the engine tracks it: tokens, progress, blocks' hashes, outputs."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from splitserve.engine.prefix_hash import BlockHash, hash_block_tokens
from splitserve.engine.sampling_params import SamplingParams


PLACEHOLDER = -1  # an output token sampled on the device and not yet read back (async scheduling)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # blocks allocated, KV on its way
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)  # identity: the scheduler looks requests up in its queues every step
class Request:
    """Progress is ``num_computed_tokens`` catching up to ``num_tokens``.

    A prefix-cache hit, a prefill chunk and KV pulled from another worker all
    advance the same counter. When it catches up, the next token is sampled.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)

    all_token_ids: list[int] = field(init=False)
    output_token_ids: list[int] = field(default_factory=list, init=False)
    output_logprobs: list[TokenLogprob] = field(default_factory=list, init=False)
    # With sampling_params.prompt_logprobs: prompt token i + 1's logprob given tokens 0..i, filled as prefill goes.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list, init=False)
    num_computed_tokens: int = field(default=0, init=False)
    num_cached_tokens: int | None = field(default=None, init=False)  # prefix hits at first schedule
    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    finish_reason: FinishReason | None = field(default=None, init=False)
    block_hashes: list[BlockHash] = field(default_factory=list, init=False)
    num_pending_tokens: int = field(default=0, init=False)  # trailing PLACEHOLDERs, 0 or 1
    # Speculative decoding: tokens proposed to follow all_token_ids, checked by the next step; never hashed or cached.
    spec_token_ids: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_output(self, token_id: int, logprob: TokenLogprob | None = None) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)

    def append_placeholder(self) -> None:
        """A token was sampled on the device and is still on its way: it holds a place in the
        sequence (the next step computes it from the device copy) until ``resolve_placeholder``."""
        assert self.num_pending_tokens == 0, "one step in flight at most"
        self.output_token_ids.append(PLACEHOLDER)
        self.all_token_ids.append(PLACEHOLDER)
        self.num_pending_tokens = 1

    def resolve_placeholder(self, token_id: int) -> None:
        assert self.num_pending_tokens == 1 and self.output_token_ids[-1] == PLACEHOLDER
        self.output_token_ids[-1] = self.all_token_ids[-1] = token_id
        self.num_pending_tokens = 0

    def update_block_hashes(self, block_size: int, extra_keys: tuple[str, ...] = ()) -> list[BlockHash]:
        """Extends ``block_hashes`` to cover every full block of known tokens (a placeholder is not)."""
        known = self.num_tokens - self.num_pending_tokens
        for start in range(len(self.block_hashes) * block_size, known - block_size + 1, block_size):
            parent = self.block_hashes[-1] if self.block_hashes else None
            self.block_hashes.append(hash_block_tokens(parent, self.all_token_ids[start : start + block_size], extra_keys))
        return self.block_hashes

    def check_stop(self, max_model_len: int) -> FinishReason | None:
        """Whether the newest output token ends the request."""
        if not self.output_token_ids:
            return None
        last = self.output_token_ids[-1]
        params = self.sampling_params
        if (not params.ignore_eos and last in self.eos_token_ids) or last in params.stop_token_ids:
            return FinishReason.STOP
        if self.length_reached(max_model_len):
            return FinishReason.LENGTH
        return None

    def length_reached(self, max_model_len: int) -> bool:
        """No token may follow the newest one (placeholders count: their place is certain)."""
        return self.num_output_tokens >= self.sampling_params.max_tokens or self.num_tokens >= max_model_len
