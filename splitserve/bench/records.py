"""What the load generator observed about one request: the raw timestamps every metric
is computed from. Times are seconds from ``time.perf_counter``; after a run they are
rebased so that 0 is the moment the benchmark started sending.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Usage:
    """Token counts as the server reported them in the stream's Final message."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass(frozen=True)
class RequestRecord:
    """One request's outcome. ``error_code is None`` means it succeeded.

    A chunk is one streamed Delta that carried at least one token id; chunk ``i``
    arrived at ``chunk_times[i]`` with ``chunk_num_tokens[i]`` tokens.
    """

    index: int  # position in the dataset
    request_id: str
    send_time: float
    chunk_times: tuple[float, ...]
    chunk_num_tokens: tuple[int, ...]
    end_time: float  # the stream closed (Final received, error, or timeout)
    prompt_len: int | None  # known to the client for token-id prompts; None for text
    max_tokens: int  # as sent
    usage: Usage | None  # None when no Final arrived
    finish_reason: str | None
    error_code: str | None  # a gRPC status name (INVALID_ARGUMENT, ...) or a client-side code
    error_message: str | None = None
    injected_invalid: bool = False  # sent with a deliberately invalid parameter

    def __post_init__(self) -> None:
        if len(self.chunk_times) != len(self.chunk_num_tokens):
            raise ValueError("chunk_times and chunk_num_tokens differ in length")
        if any(n <= 0 for n in self.chunk_num_tokens):
            raise ValueError("every chunk carries at least one token")
        times = (self.send_time, *self.chunk_times)
        if any(b < a for a, b in zip(times, times[1:])):
            raise ValueError("chunk times must not precede the send time or each other")
        # The metrics rely on this: a successful request has a first token.
        if self.error_code is None and not self.chunk_times:
            raise ValueError("a successful record needs at least one chunk")

    @property
    def success(self) -> bool:
        return self.error_code is None

    @property
    def num_streamed_tokens(self) -> int:
        return sum(self.chunk_num_tokens)

    def shifted(self, offset: float) -> RequestRecord:
        """The same record with every timestamp moved by ``offset`` seconds."""
        return replace(
            self,
            send_time=self.send_time + offset,
            chunk_times=tuple(t + offset for t in self.chunk_times),
            end_time=self.end_time + offset,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        usage = data.get("usage")
        return cls(
            **{
                **data,
                "chunk_times": tuple(data["chunk_times"]),
                "chunk_num_tokens": tuple(data["chunk_num_tokens"]),
                "usage": Usage(**usage) if usage is not None else None,
            }
        )
