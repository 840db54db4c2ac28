"""The OpenAI request bodies the router accepts, and the error shape it answers with.

Types are strict (``"max_tokens": "16"`` is refused, not coerced). Fields this server does not
know are ignored, as vLLM does: SDKs send newer fields all the time. Fields it knows but
cannot honour (best_of, streamed prompt logprobs, ...) are refused with a 400 that names them.
Constrained output: response_format (json_object, json_schema) and vLLM's structured_outputs
(json, regex, choice, grammar, json_object) or its older guided_json/regex/choice/grammar.
Extensions over OpenAI's API, as vLLM and SGLang spell them: top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids, skip_special_tokens; and timeout_seconds,
a per-request deadline (504 when it passes).
"""
from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

TokenId = Annotated[int, Field(ge=0, lt=2**32)]


class OpenAIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """What completions and chat completions share."""

    # allow_inf_nan: JSON's 1e999 parses as inf, which no sampling field may take.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, lt=2**32)
    temperature: float | None = None  # OpenAI's default is 1.0: sampling, unlike the gRPC API
    top_p: float | None = None
    top_k: int | None = Field(None, ge=-1, lt=2**31)  # -1 (vLLM) or 0: off
    min_p: float | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    timeout_seconds: float | None = None
    # Constrained output (services/router/openai/structured.py): OpenAI's, then vLLM's.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None


class CompletionRequest(OpenAIRequest):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=0, lt=2**32)  # OpenAI's and vLLM's default; 0: echo the prompt alone
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM's extension


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # name, tool_calls, tool_call_id... pass through to the chat template untouched.
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, lt=2**32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    add_generation_prompt: bool = True
    prompt_logprobs: int | None = None  # vLLM's; refused here (taken on /v1/completions) rather than ignored
    chat_template_kwargs: dict[str, Any] | None = None


_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|.*\[.*\])$")


def parse(model: type[BaseModel], body: bytes) -> Any:
    """The validated request, or OpenAIError(400) naming the first bad field."""
    try:
        return model.model_validate_json(body or b"")
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        if error["type"] == "json_invalid":
            raise OpenAIError(400, f"the body is not valid JSON: {error['msg']}") from None
        if error["type"] == "model_type" and not error["loc"]:
            raise OpenAIError(400, "the body must be a JSON object") from None
        # Union members show up in the location ("stop", "list[str]", 0): leave them out.
        param = ".".join(str(p) for p in error["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p))) or None
        message = error["msg"] if param is None else f"{param}: {error['msg']}"
        if error["type"] not in ("missing",) and "input" in error and not isinstance(error["input"], (dict, list)):
            message += f" (got {repr(error['input'])[:80]})"
        raise OpenAIError(400, message, param=param) from None
