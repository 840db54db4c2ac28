"""Checks a public GenerateRequest and turns it into the internal EngineRequest."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from splitserve.engine.errors import InvalidRequestError
from splitserve.services.convert import sampling_params_from_proto
from splitserve.v1 import generation_pb2 as gen_pb
from splitserve.v1 import worker_pb2 as worker_pb


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    max_model_len: int
    max_tokens_limit: int
    default_max_tokens: int


@dataclass(frozen=True)
class PreparedRequest:
    engine_request: worker_pb.EngineRequest
    stop: list[str]
    skip_special_tokens: bool
    timeout_seconds: float | None


def prepare(msg: gen_pb.GenerateRequest, tokenizer: PreTrainedTokenizerBase, limits: ModelLimits) -> PreparedRequest:
    """Raises InvalidRequestError naming the offending field; nothing reaches a worker unchecked."""
    which = msg.WhichOneof("prompt")
    if which is None:
        raise InvalidRequestError("prompt", "set text or token_ids")
    if which == "text":
        if not msg.text:
            raise InvalidRequestError("text", "is empty")
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
    if msg.HasField("timeout_seconds") and not msg.timeout_seconds > 0:
        raise InvalidRequestError("timeout_seconds", f"must be positive, got {msg.timeout_seconds}")
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
    sampling_params_from_proto(engine_request)  # validates the sampling fields, naming the bad one
    return PreparedRequest(
        engine_request=engine_request,
        stop=list(msg.stop),
        skip_special_tokens=msg.skip_special_tokens if msg.HasField("skip_special_tokens") else True,
        timeout_seconds=msg.timeout_seconds if msg.HasField("timeout_seconds") else None,
    )
