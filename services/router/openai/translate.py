"""OpenAI request bodies -> the router's GenerateRequest: the same message the gRPC API takes."""
from __future__ import annotations

from typing import Any

from splitserve.services.router.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    OpenAIRequest,
)
from transformers import PreTrainedTokenizerBase

from splitserve.services.router.openai.structured import constraint
from splitserve.services.router.openai.tools import tool_constraint, tool_parser
from splitserve.services.router.request_input import ModelLimits
from splitserve.v1 import generation_pb2 as gen_pb

_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty")
OPENAI_DEFAULT_TEMPERATURE = 1.0
# What a request may pass to the checkpoint's chat template. A template of the request's own
# ("chat_template") runs in the router, so it is refused unless --trust-request-chat-template.
CHAT_TEMPLATE_KWARGS = frozenset({"enable_thinking", "thinking", "reasoning_effort"})


def _unsupported(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param, code="unsupported_parameter")


MAX_CHOICES = 128  # prompts x n in one request: each is a request on the workers


def _check_common(req: OpenAIRequest, num_prompts: int = 1) -> None:
    if not 1 <= req.n <= MAX_CHOICES // num_prompts:
        raise OpenAIError(400, f"n: must be in [1, {MAX_CHOICES // num_prompts}] ({num_prompts} prompts x n choices, at most {MAX_CHOICES}), got {req.n}", param="n")
    if req.best_of not in (None, 1):
        # vLLM's V1 engine dropped it too: n samples are returned, never ranked and cut.
        raise _unsupported("best_of", f"is not supported (got {req.best_of}): send n for several samples")
    if req.stream_options is not None and not req.stream:
        raise OpenAIError(400, "stream_options: only allowed when stream is true", param="stream_options")
    if req.timeout_seconds is not None and not req.timeout_seconds > 0:
        raise OpenAIError(400, f"timeout_seconds: must be positive, got {req.timeout_seconds}", param="timeout_seconds")


def _generate_request(req: OpenAIRequest, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> gen_pb.GenerateRequest:
    sampling: dict[str, Any] = {name: getattr(req, name) for name in _SAMPLING if getattr(req, name) is not None}
    sampling.setdefault("temperature", OPENAI_DEFAULT_TEMPERATURE)
    if sampling.get("top_k") == -1:
        sampling["top_k"] = 0
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    msg = gen_pb.GenerateRequest(
        sampling=gen_pb.SamplingParams(**sampling),
        max_tokens=max_tokens or 0,  # 0: the router's default
        stop=stop,
        stop_token_ids=req.stop_token_ids or [],
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        skip_special_tokens=req.skip_special_tokens,
    )
    if req.timeout_seconds is not None:
        msg.timeout_seconds = req.timeout_seconds
    msg.sampling.logit_bias.update(_logit_bias(req.logit_bias or {}))
    found = constraint(req, req.response_format)
    if found is not None:
        msg.sampling.constraint.CopyFrom(found[0])
    return msg


def constraint_param(req: OpenAIRequest) -> str | None:
    """The OpenAI field the request's constraint came from (for errors found after translation)."""
    found = constraint(req, req.response_format)
    if found is None and isinstance(req, ChatCompletionRequest) and (tools := tool_constraint(req.tools, req.tool_choice)) is not None:
        return tools[2]
    return found[1] if found is not None else None


def _logit_bias(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's keys are token ids as strings. Ranges are checked on the shared path, the
    vocabulary by ``check_logit_bias``."""
    bad = next((t for t in bias if not (t.isascii() and t.isdigit() and int(t) < 2**32)), None)
    if bad is not None:
        raise OpenAIError(400, f"logit_bias: keys are token ids, got {bad!r}", param="logit_bias")
    return {int(token): value for token, value in bias.items()}


def check_logit_bias(msg: gen_pb.GenerateRequest, vocab_size: int) -> None:
    bad = next((t for t in msg.sampling.logit_bias if t >= vocab_size), None)
    if bad is not None:
        raise OpenAIError(400, f"logit_bias: token id {bad} is outside the vocabulary [0, {vocab_size})", param="logit_bias")


def completion_request(req: CompletionRequest) -> tuple[list[str | list[int]], gen_pb.GenerateRequest]:
    """The prompts (one, or a batch), and the request each is sent with (prompt and max_tokens unset)."""
    prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], (str, list)) else [req.prompt]
    if len(prompts) > MAX_CHOICES:
        raise OpenAIError(400, f"prompt: a batch of at most {MAX_CHOICES} prompts is taken, got {len(prompts)}", param="prompt")
    _check_common(req, len(prompts))
    if req.suffix:
        raise _unsupported("suffix", "is not supported")
    wants_prompt = req.prompt_logprobs is not None or (req.echo and req.logprobs is not None)
    if wants_prompt and req.stream:
        param = "prompt_logprobs" if req.prompt_logprobs is not None else "echo"
        raise _unsupported(param, "prompt logprobs are not streamed by this server: send stream false")
    if req.max_tokens == 0 and not req.echo:
        raise OpenAIError(400, "max_tokens: 0 is only allowed with echo (the prompt alone)", param="max_tokens")
    msg = _generate_request(req, None, req.logprobs is not None, req.logprobs or 0)
    if wants_prompt:
        msg.prompt_logprobs = max(req.prompt_logprobs or 0, req.logprobs or 0 if req.echo else 0)
    return prompts, msg


def chat_request(
    req: ChatCompletionRequest, tokenizer: PreTrainedTokenizerBase, limits: ModelLimits, trust_chat_template: bool = False
) -> gen_pb.GenerateRequest:
    _check_common(req)
    _check_chat_template_kwargs(req.chat_template_kwargs or {}, trust_chat_template)
    if req.prompt_logprobs is not None:
        raise _unsupported("prompt_logprobs", "is taken on /v1/completions (send the chat prompt's token ids from /tokenize)")
    if req.top_logprobs is not None and not req.logprobs:
        raise OpenAIError(400, "top_logprobs: needs logprobs to be true", param="top_logprobs")
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise OpenAIError(400, "max_tokens and max_completion_tokens disagree: send one", param="max_completion_tokens")
    msg = _generate_request(req, req.max_completion_tokens or req.max_tokens, req.logprobs, req.top_logprobs or 0)
    tools = tool_constraint(req.tools, req.tool_choice)
    if tools is not None:
        if msg.sampling.HasField("constraint"):
            raise OpenAIError(400, f"tool_choice: a required tool call cannot be combined with {constraint_param(req)}", param="tool_choice")
        msg.sampling.constraint.json_schema = tools[1]
    elif req.tools and req.tool_choice != "none":
        tool_parser(req.tools, req.tool_choice, "")  # checks the tools' shapes
    msg.token_ids.ids.extend(chat_prompt(req, tokenizer, limits))
    return msg


def _check_chat_template_kwargs(kwargs: dict[str, Any], trust_chat_template: bool) -> None:
    allowed = CHAT_TEMPLATE_KWARGS | ({"chat_template"} if trust_chat_template else set())
    refused = sorted(set(kwargs) - allowed)
    if "chat_template" in refused:
        raise _unsupported("chat_template_kwargs.chat_template", "a request's own chat template is not accepted by this server (--trust-request-chat-template)")
    if refused:
        raise _unsupported(f"chat_template_kwargs.{refused[0]}", f"is not accepted; allowed: {', '.join(sorted(allowed))}")


def chat_prompt(req: ChatCompletionRequest, tokenizer: PreTrainedTokenizerBase, limits: ModelLimits) -> list[int]:
    """The prompt's token ids through the checkpoint's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(
            400, "this model's checkpoint has no chat template, so chat messages cannot be turned into a prompt: use /v1/completions",
            param="messages", code="no_chat_template",
        )
    messages = []
    for i, m in enumerate(req.messages):
        message = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            if any(part.type != "text" for part in m.content):
                raise _unsupported(f"messages.{i}.content", "only text content parts are supported")
            message["content"] = "\n".join(part.text or "" for part in m.content)
        message.setdefault("content", "")
        messages.append(message)
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=req.tools if req.tools and req.tool_choice != "none" else None, tokenize=False,
            add_generation_prompt=req.add_generation_prompt, **(req.chat_template_kwargs or {})
        )
    except Exception as e:  # noqa: BLE001 -- the template's own checks (roles must alternate, ...) or its Jinja errors
        raise OpenAIError(400, f"messages: the chat template refused them: {e}", param="messages") from None
    if len(text) > limits.max_prompt_chars:  # checked before tokenizing, as for a text prompt
        raise OpenAIError(400, f"messages: the prompt has {len(text)} characters, more than the context length can hold", param="messages")
    # The template writes the special tokens (BOS included): the tokenizer must not add them again.
    return tokenizer.encode(text, add_special_tokens=False)
