"""Checks a public GenerateRequest and turns it into the internal EngineRequest.

Every check that bounds what a request costs the router comes before the work it bounds: a
prompt's length in characters before it is tokenized (a text of more characters than the
context length times the longest token cannot fit), the stop strings' number and length
before they are matched at every token, non-finite floats before they reach a sampler.
"""
from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from splitserve.engine.constraint import Constraint
from splitserve.engine.errors import InvalidRequestError
from splitserve.services.convert import sampling_params_from_proto
from splitserve.v1 import generation_pb2 as gen_pb
from splitserve.v1 import worker_pb2 as worker_pb


MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # each; both bound the stop-string matching done at every output token
MAX_REQUEST_ID_CHARS = 256
# Texts longer than this are tokenized on a thread (the Rust tokenizer releases the GIL), so a
# long prompt costs the event loop nothing; shorter ones are cheaper to do in place.
TOKENIZE_ON_THREAD_CHARS = 4096
# Room in a request for everything but the prompt (sampling fields, stop strings, JSON syntax).
REQUEST_OVERHEAD_BYTES = 1 << 20


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    max_model_len: int
    max_tokens_limit: int
    default_max_tokens: int
    max_token_chars: int = 64  # characters of the tokenizer's longest token (longest_token_chars)

    @property
    def max_prompt_chars(self) -> int:
        """A text prompt longer than this cannot be under ``max_model_len`` tokens: refused untokenized."""
        return self.max_model_len * self.max_token_chars

    @property
    def max_request_bytes(self) -> int:
        """The largest valid request: a longest prompt at 8 bytes a character (UTF-8, or JSON's
        \\uXXXX escapes), and room for the rest. The HTTP body limit and gRPC's receive limit."""
        return 8 * self.max_prompt_chars + REQUEST_OVERHEAD_BYTES


def longest_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many characters one token can stand for (at least one more, for normalizers that add a space)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1) + 1


@dataclass(frozen=True)
class PreparedRequest:
    engine_request: worker_pb.EngineRequest
    stop: list[str]
    skip_special_tokens: bool
    timeout_seconds: float | None


async def prepare(
    msg: gen_pb.GenerateRequest, tokenizer: PreTrainedTokenizerBase, limits: ModelLimits,
    check_constraint: Callable[[Constraint], Awaitable[None]] | None = None,
) -> PreparedRequest:
    """Raises InvalidRequestError naming the offending field; nothing reaches a worker unchecked.
    ``check_constraint``: compiles a request's constraint (an invalid one is refused here)."""
    which = msg.WhichOneof("prompt")
    if which is None:
        raise InvalidRequestError("prompt", "set text or token_ids")
    check_bounds(msg, limits)
    if which == "text":
        if not msg.text:
            raise InvalidRequestError("text", "is empty")
        if len(msg.text) > TOKENIZE_ON_THREAD_CHARS:
            prompt = await asyncio.to_thread(tokenizer.encode, msg.text)
        else:
            prompt = tokenizer.encode(msg.text)
    else:
        prompt = list(msg.token_ids.ids)
        if not prompt:
            raise InvalidRequestError("token_ids", "is empty")
        bad = next((t for t in prompt if t >= limits.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError("token_ids", f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
    if len(prompt) >= limits.max_model_len:
        raise InvalidRequestError("prompt", f"has {len(prompt)} tokens; the context length is {limits.max_model_len}")
    max_tokens = msg.max_tokens or min(limits.default_max_tokens, limits.max_model_len - len(prompt))
    if max_tokens > limits.max_tokens_limit:
        raise InvalidRequestError("max_tokens", f"{max_tokens} is over the limit {limits.max_tokens_limit}")
    bad = next((t for t in msg.stop_token_ids if t >= limits.vocab_size), None)
    if bad is not None:
        raise InvalidRequestError("stop_token_ids", f"token id {bad} is outside the vocabulary")
    if msg.HasField("timeout_seconds") and not (msg.timeout_seconds > 0 and math.isfinite(msg.timeout_seconds)):
        raise InvalidRequestError("timeout_seconds", f"must be positive and finite, got {msg.timeout_seconds}")
    engine_request = worker_pb.EngineRequest(
        request_id=msg.request_id or uuid.uuid4().hex,
        prompt_token_ids=prompt,
        sampling=msg.sampling,
        max_tokens=max_tokens,
        stop_token_ids=msg.stop_token_ids,
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
    )
    if msg.HasField("prompt_logprobs"):
        engine_request.prompt_logprobs = msg.prompt_logprobs
    params = sampling_params_from_proto(engine_request)  # validates the sampling fields, naming the bad one
    if params.constraint is not None and check_constraint is not None:
        await check_constraint(params.constraint)
    return PreparedRequest(
        engine_request=engine_request,
        stop=list(msg.stop),
        skip_special_tokens=msg.skip_special_tokens if msg.HasField("skip_special_tokens") else True,
        timeout_seconds=msg.timeout_seconds if msg.HasField("timeout_seconds") else None,
    )


def check_bounds(msg: gen_pb.GenerateRequest, limits: ModelLimits) -> None:
    """The checks that bound the request's cost, all before any of it is spent."""
    if len(msg.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError("request_id", f"has {len(msg.request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}")
    if msg.WhichOneof("prompt") == "text" and len(msg.text) > limits.max_prompt_chars:
        raise InvalidRequestError(
            "text", f"has {len(msg.text)} characters, more than {limits.max_model_len} tokens (the context length) can hold"
        )
    if len(msg.stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError("stop", f"has {len(msg.stop)} stop strings; the limit is {MAX_STOP_STRINGS}")
    longest = max((len(s) for s in msg.stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise InvalidRequestError("stop", f"a stop string has {longest} characters; the limit is {MAX_STOP_CHARS}")
    for field, value in msg.sampling.ListFields():
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequestError(f"sampling.{field.name}", f"must be a finite number, got {value}")
