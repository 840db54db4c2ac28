"""Prompts of the HTTP API as token ids, and the output length each gets.

The HTTP API tokenizes text prompts itself (then sends token ids down the shared request
path, which does not tokenize again) because OpenAI's semantics need the prompt's length
before a request is sent: a prompt plus ``max_tokens`` over the context is refused with the
numbers, and an unset ``max_tokens`` means the rest of the context, as in vLLM.
"""
from __future__ import annotations

import asyncio

from splitserve.services.router.openai.protocol import OpenAIError
from splitserve.services.router.request_input import TOKENIZE_ON_THREAD_CHARS, ModelLimits
from transformers import PreTrainedTokenizerBase


async def prompt_token_ids(prompt: str | list[int], tokenizer: PreTrainedTokenizerBase, limits: ModelLimits, param: str) -> list[int]:
    """Token ids of one prompt; a text too long for the context is refused before it is tokenized."""
    if not prompt:
        raise OpenAIError(400, f"{param}: is empty", param=param)
    if not isinstance(prompt, str):
        return list(prompt)  # checked against the vocabulary on the shared path
    if len(prompt) > limits.max_prompt_chars:
        raise OpenAIError(400, f"{param}: has {len(prompt)} characters, more than {limits.max_model_len} tokens (the context length) can hold", param=param)
    if len(prompt) > TOKENIZE_ON_THREAD_CHARS:  # the Rust tokenizer releases the GIL: the event loop goes on
        return await asyncio.to_thread(tokenizer.encode, prompt)
    return tokenizer.encode(prompt)


def output_budget(requested: int | None, num_prompt_tokens: int, limits: ModelLimits, param: str = "max_tokens") -> int:
    """``requested``, or the rest of the context up to the server's cap; OpenAIError(400) with the
    numbers when the prompt leaves no room or the prompt and ``requested`` exceed the context."""
    room = limits.max_model_len - num_prompt_tokens
    if requested is None:
        if room < 1:
            raise OpenAIError(
                400, f"the prompt has {num_prompt_tokens} tokens, which leaves no room for output in this model's context "
                f"length of {limits.max_model_len} tokens", param="prompt", code="context_length_exceeded",
            )
        return min(room, limits.max_tokens_limit)
    if requested > room:
        raise OpenAIError(
            400, f"this model's context length is {limits.max_model_len} tokens; the prompt has {num_prompt_tokens} tokens "
            f"and {param} asks for {requested}: {num_prompt_tokens + requested} in all", param=param, code="context_length_exceeded",
        )
    return requested
