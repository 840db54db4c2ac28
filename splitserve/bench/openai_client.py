"""The benchmark's OpenAI HTTP backends: ``/v1/completions`` and ``/v1/chat/completions`` with
``stream: true``, so one tool measures splitserve, vLLM and SGLang on the same workload.

Timing follows vLLM's benchmark request functions (``async_request_openai_completions`` and
``..._chat_completions``): a *chunk* is an SSE event whose ``choices`` is not empty, whatever
its text (the chat stream's first event, the assistant's role, counts, as it does there);
TTFT is send -> the first such event; the usage-only event at the end is not a chunk. Each
chunk counts one token, as vLLM counts it, and the output length is the server's
``usage.completion_tokens``. SSE events per request are ``len(chunk_times)``.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import aiohttp

from splitserve.bench.client import ABORTED, NO_FINAL, NO_TOKENS, ModelInfo
from splitserve.bench.datasets import BenchRequest
from splitserve.bench.records import RequestRecord, Usage

BACKENDS = ("grpc", "openai-completions", "openai-chat")
_PATHS = {"openai-completions": "/v1/completions", "openai-chat": "/v1/chat/completions"}


class OpenAIClient:
    """Async client for one or several HTTP servers of one platform (requests go to them in
    turn). ``tokenizer`` (a transformers tokenizer) gives the vocabulary and EOS ids when the
    server does not report them, and the prompt text for chat (random prompts are token ids)."""

    def __init__(
        self, backend: str, targets: str | Sequence[str], request_timeout_s: float | None, ignore_eos: bool,
        sampling: Sequence[tuple[str, float]] = (), tokenizer: Any = None, api_key: str | None = None,
    ) -> None:
        targets = [targets] if isinstance(targets, str) else list(targets)
        self._bases = [t if "://" in t else f"http://{t}" for t in targets]
        self._urls = itertools.cycle(base + _PATHS[backend] for base in self._bases)
        self._chat = backend == "openai-chat"
        self._ignore_eos = ignore_eos
        self._sampling = dict(sampling)
        self._sampling.setdefault("temperature", 0.0)  # greedy unless asked, as the gRPC backend
        self._tokenizer = tokenizer
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._model = ""
        # No connection cap (aiohttp's default is 100): the load generator decides concurrency.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=False)

    async def __aenter__(self) -> OpenAIClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._session.close()

    async def model_info(self, wait_s: float) -> ModelInfo:
        """GET /v1/models on every target, retried until ``wait_s`` passes; raises ConnectionError
        when one does not answer, ValueError when they serve different models."""
        cards = [await self._model_card(base, wait_s) for base in self._bases]
        if len({c["id"] for c in cards}) > 1:
            raise ValueError(f"the targets serve different models: {sorted({c['id'] for c in cards})}")
        card = cards[0]
        self._model = card["id"]
        vocab_size = card.get("vocab_size") or 0  # splitserve reports it; vLLM and SGLang do not
        eos = tuple(card.get("eos_token_ids") or ())
        if self._tokenizer is not None:
            vocab_size = len(self._tokenizer)
            eos = tuple({i for i in (self._tokenizer.eos_token_id, *eos) if i is not None})
        return ModelInfo(
            model=card["id"], architecture=card.get("owned_by", ""), max_model_len=card.get("max_model_len") or 0,
            vocab_size=vocab_size, eos_token_ids=eos, max_tokens_limit=card.get("max_tokens_limit") or 0, block_size=0,
        )

    async def _model_card(self, base: str, wait_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                async with self._session.get(base + "/v1/models", headers=self._headers) as response:
                    response.raise_for_status()
                    return (await response.json())["data"][0]
            except aiohttp.ClientError as e:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"{base}/v1/models: {e}") from None
            await asyncio.sleep(0.5)

    def _payload(self, request: BenchRequest) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": self._model, "stream": True, "stream_options": {"include_usage": True}, **self._sampling}
        if self._ignore_eos:
            payload["ignore_eos"] = True
        if self._chat:
            prompt = request.prompt_text
            if prompt is None:
                if self._tokenizer is None:
                    raise ValueError("openai-chat sends text: token-id prompts need --tokenizer")
                prompt = self._tokenizer.decode(request.prompt_token_ids)
            payload["messages"] = [{"role": "user", "content": prompt}]
            payload["max_completion_tokens"] = request.max_tokens
        else:
            payload["prompt"] = list(request.prompt_token_ids) if request.prompt_token_ids is not None else request.prompt_text
            payload["max_tokens"] = request.max_tokens
        return payload

    async def generate(self, request: BenchRequest, request_id: str) -> RequestRecord:
        payload = self._payload(request)
        chunk_times: list[float] = []
        usage: Usage | None = None
        finish_reason: str | None = None
        error_code = error_message = None
        headers = {**self._headers, "X-Request-Id": request_id}
        send_time = time.perf_counter()
        try:
            async with self._session.post(next(self._urls), json=payload, headers=headers, timeout=self._timeout) as response:
                if response.status != 200:
                    body = await response.text()
                    error_code, error_message = f"HTTP_{response.status}", _error_message(body)
                else:
                    async for line in response.content:  # one SSE field per line
                        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                            continue
                        now = time.perf_counter()
                        event = json.loads(line[6:])
                        if "error" in event:
                            error_code, error_message = "STREAM_ERROR", _error_message(event)
                        elif choices := event.get("choices"):
                            chunk_times.append(now)
                            finish_reason = choices[0].get("finish_reason") or finish_reason
                        if u := event.get("usage"):
                            usage = Usage(u["prompt_tokens"], u["completion_tokens"], (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        except (aiohttp.ClientError, TimeoutError) as e:
            error_code, error_message = type(e).__name__, str(e)
        end_time = time.perf_counter()
        if error_code is None:
            if usage is None:
                error_code, error_message = NO_FINAL, "the stream ended without a usage event"
            elif finish_reason == "abort":
                error_code, error_message = ABORTED, "the server aborted the request"
            elif not chunk_times:
                error_code, error_message = NO_TOKENS, "the stream carried no chunk"
        return RequestRecord(
            index=request.index, request_id=request_id, send_time=send_time, chunk_times=tuple(chunk_times),
            chunk_num_tokens=(1,) * len(chunk_times), end_time=end_time, prompt_len=request.prompt_len,
            max_tokens=request.max_tokens, usage=usage, finish_reason=finish_reason, error_code=error_code,
            error_message=error_message, injected_invalid=request.injected_invalid,
        )


def _error_message(body: str | dict) -> str:
    try:
        data = json.loads(body) if isinstance(body, str) else body
        return str(data["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return str(body)[:200]
