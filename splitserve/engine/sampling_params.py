"""Per-request sampling settings, validated when built."""
from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.engine.constraint import Constraint
from splitserve.engine.errors import InvalidRequestError

MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. ``temperature == 0`` is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: bool = False  # return the sampled token's logprob
    top_logprobs: int = 0  # and this many most likely alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits before sampling
    prompt_logprobs: int | None = None  # the prompt tokens' logprobs (after the first), with this many alternatives
    constraint: Constraint | None = None  # the output must match it (grammar-constrained decoding)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError("logit_bias", f"has {len(self.logit_bias)} entries; the limit is {MAX_LOGIT_BIAS}")
        bad = next(((t, b) for t, b in self.logit_bias if t < 0 or not -100.0 <= b <= 100.0), None)
        if bad is not None:
            raise InvalidRequestError("logit_bias", f"token {bad[0]}: the bias must be in [-100, 100] for a token id >= 0, got {bad[1]!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            raise InvalidRequestError("temperature", f"must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not self.repetition_penalty > 0.0:
            raise InvalidRequestError("repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(name, f"must be in [-2, 2], got {getattr(self, name)!r}")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            raise InvalidRequestError("top_logprobs", f"must be in [0, 20], got {self.top_logprobs!r}")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int) or not 0 <= self.prompt_logprobs <= 20):
            raise InvalidRequestError("prompt_logprobs", f"must be in [0, 20], got {self.prompt_logprobs!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError("seed", f"must be in [0, 2**63), got {self.seed!r}")
        if self.constraint is not None and self.ignore_eos:
            raise InvalidRequestError("ignore_eos", "cannot be combined with a constraint: the output ends where its grammar does")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
