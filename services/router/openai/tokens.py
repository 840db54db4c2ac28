"""vLLM's utility routes on the HTTP port: /tokenize, /detokenize, /version and /metrics.

Shapes as vLLM answers them, so its clients and benchmarks work unchanged: /tokenize takes a
``prompt`` or chat ``messages`` and returns ``count``, ``max_model_len`` and ``tokens``;
/detokenize takes ``tokens`` and returns ``prompt``.
"""
from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from splitserve.services.router.generation import GenerationService
from splitserve.services.router.openai.prompts import prompt_token_ids
from splitserve.services.router.openai.protocol import ChatCompletionRequest, ChatMessage, OpenAIError, TokenId, parse
from splitserve.services.router.openai.translate import chat_prompt

MAX_DETOKENIZE_TOKENS = 1 << 17  # past a context of any model served here
DECODE_ON_THREAD_TOKENS = 4096  # longer decodes leave the event loop to other requests


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    tokens: list[TokenId] = Field(max_length=MAX_DETOKENIZE_TOKENS)


def _version() -> str:
    try:
        return version("splitserve")
    except PackageNotFoundError:
        return "unknown"


class TokenRoutes:
    def __init__(self, service: GenerationService, check_model) -> None:
        self.service = service
        self.check_model = check_model
        self.version = {"version": _version()}

    async def tokenize(self, request: Request) -> dict[str, Any]:
        req = parse(TokenizeRequest, await request.body())
        self.check_model(req.model)
        limits, tokenizer = self.service.settings.limits, self.service.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError(400, "send one of prompt and messages", param="prompt")
        if req.messages is not None:
            chat = ChatCompletionRequest.model_validate(
                {"messages": [m.model_dump(exclude_none=True) for m in req.messages], "add_generation_prompt": req.add_generation_prompt}
            )
            ids = chat_prompt(chat, tokenizer, limits)
        elif req.add_special_tokens:
            ids = await prompt_token_ids(req.prompt, tokenizer, limits, "prompt")
        else:
            if len(req.prompt) > limits.max_prompt_chars:
                raise OpenAIError(400, f"prompt: has {len(req.prompt)} characters, more than the context length can hold", param="prompt")
            ids = tokenizer.encode(req.prompt, add_special_tokens=False)
        return {"count": len(ids), "max_model_len": limits.max_model_len, "tokens": ids, "token_strs": None}

    async def detokenize(self, request: Request) -> dict[str, Any]:
        req = parse(DetokenizeRequest, await request.body())
        self.check_model(req.model)
        vocab_size = self.service.settings.limits.vocab_size
        bad = next((t for t in req.tokens if t >= vocab_size), None)
        if bad is not None:
            raise OpenAIError(400, f"tokens: token id {bad} is outside the vocabulary [0, {vocab_size})", param="tokens")
        decode = self.service.tokenizer.decode
        text = await asyncio.to_thread(decode, req.tokens) if len(req.tokens) > DECODE_ON_THREAD_TOKENS else decode(req.tokens)
        return {"prompt": text}

    async def get_version(self) -> dict[str, str]:
        return self.version

    async def metrics(self) -> Response:
        """The router's own metrics (the same as on its metrics port), for scrapers of the API port."""
        return Response(generate_latest(self.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
