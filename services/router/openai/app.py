"""The OpenAI-compatible HTTP API of the router: /v1/models, /v1/completions, /v1/chat/completions.

Requests become the GenerateRequest the gRPC API takes and go down the same path
(``GenerationService.generate``): same checks, routing, limits, metrics and usage.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from splitserve.services.router.auth import MISSING_KEY, WRONG_KEY, ApiKeys, bearer
from splitserve.services.router.generation import GenerateError, GenerationService
from splitserve.services.router.openai.body_limit import BodyLimit
from splitserve.services.router.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    parse,
)
from splitserve.services.router.openai.choices import Choice, open_stream, whole
from splitserve.services.router.openai.prompts import output_budget, prompt_token_ids
from splitserve.services.router.openai.responses import ChatFormatter, CompletionFormatter, Formatter, sse
from splitserve.services.router.openai.sleep_routes import SleepRoutes
from splitserve.services.router.openai.tokens import TokenRoutes
from splitserve.services.router.openai.tools import tool_parser
from splitserve.services.router.openai.translate import chat_request, check_logit_bias, completion_request, constraint_param
from starlette.exceptions import HTTPException

from splitserve.v1 import generation_pb2 as gen_pb

log = logging.getLogger(__name__)

# gRPC status of the shared request path -> HTTP status, OpenAI error type, code.
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}
_CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, the logs do


def from_generate_error(e: GenerateError, prompt_param: str, constraint_param: str | None = None) -> OpenAIError:
    status, type_, code = _STATUS.get(e.code, (500, "server_error", "internal_error"))
    param = prompt_param if e.field in ("text", "token_ids", "prompt") else e.field
    message = e.message
    if constraint_param is not None and e.field and e.field.startswith("constraint."):  # a schema, regex or grammar that does not compile
        param, message = constraint_param, constraint_param + message[len(e.field):]
    return OpenAIError(status, message, type_, param, code)


class OpenAIRoutes:
    """The handlers, bound to the router's GenerationService."""

    def __init__(self, service: GenerationService, keys: ApiKeys | None, is_serving: Callable[[], bool]) -> None:
        self.service = service
        self.keys = keys
        self.is_serving = is_serving
        self.metrics = service.metrics
        self.model = service.settings.model_name
        self.limits = service.settings.limits
        self.started = int(time.time())

    async def authenticate(self, request: Request) -> None:
        """Runs before the body is read: a refused request does no work and reaches no worker."""
        if self.keys is None:
            return
        key = bearer(request.headers.get("authorization"))
        if not self.keys.check(key):
            self.metrics.error("unauthenticated")
            raise OpenAIError(401, MISSING_KEY if key is None else WRONG_KEY, code="invalid_api_key")

    async def health(self) -> Response:
        if self.is_serving():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "draining"}, status_code=503)

    async def _model_card(self) -> dict[str, Any]:
        s = self.service.settings
        # max_model_len as vLLM reports it; the vocabulary, EOS ids and output cap are splitserve's
        # additions, so a benchmark can draw random prompts without a tokenizer of its own.
        return {
            "id": self.model, "object": "model", "created": self.started, "owned_by": "splitserve", "root": self.model,
            "max_model_len": s.limits.max_model_len, "vocab_size": s.limits.vocab_size,
            "eos_token_ids": list(s.eos_token_ids), "max_tokens_limit": s.limits.max_tokens_limit,
            **await self.service.pool_dtypes(),  # per pool: {"kv_cache_dtype": {"decode": "float8_e4m3fn"}, ...}
        }

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [await self._model_card()]}

    async def get_model(self, model: str) -> dict[str, Any]:
        self._check_model(model)
        return await self._model_card()

    async def completions(self, request: Request) -> Response:
        body = await request.body()
        req = self._invalid_counted(lambda: parse(CompletionRequest, body))
        self._check_model(req.model)
        prompts, message = self._invalid_counted(lambda: completion_request(req))
        self._invalid_counted(lambda: check_logit_bias(message, self.limits.vocab_size))
        choices, num_prompt_tokens = [], 0
        for i, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            ids = await self._counted(prompt_token_ids(prompt, self.service.tokenizer, self.limits, param))
            num_prompt_tokens += len(ids)
            echo = (prompt if isinstance(prompt, str) else self.service.tokenizer.decode(ids)) if req.echo else ""
            one = gen_pb.GenerateRequest()
            one.CopyFrom(message)
            one.token_ids.ids.extend(ids)
            prompt_logprobs = message.HasField("prompt_logprobs")
            # max_tokens 0 with prompt logprobs: one token is made for them and dropped.
            requested = 1 if prompt_logprobs and req.max_tokens == 0 else req.max_tokens
            one.max_tokens = self._invalid_counted(lambda: output_budget(requested, len(ids), self.limits)) if requested != 0 else 0
            first = ids[0] if prompt_logprobs else None
            choices += [Choice(m, echo, len(ids), one.max_tokens > 0, first, req.max_tokens != 0) for m in _samples(one, req.n)]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        fmt = CompletionFormatter(self.model, self.service.tokenizer, req.logprobs is not None, include_usage,
                                  echo_logprobs=req.echo and req.logprobs is not None, prompt_logprobs=req.prompt_logprobs is not None)
        return await self._respond(request, choices, fmt, req.stream, num_prompt_tokens, "prompt", constraint_param(req))

    async def chat_completions(self, request: Request) -> Response:
        body = await request.body()
        req = self._invalid_counted(lambda: parse(ChatCompletionRequest, body))
        self._check_model(req.model)
        settings = self.service.settings
        # On a thread: the checkpoint's template renders in Jinja and the text is tokenized, both
        # costs that grow with the messages; on the event loop they held every other client.
        build = functools.partial(chat_request, req, self.service.tokenizer, settings.limits, settings.trust_request_chat_template)
        message = await self._counted(asyncio.to_thread(build))
        self._invalid_counted(lambda: check_logit_bias(message, self.limits.vocab_size))
        num_prompt_tokens = len(message.token_ids.ids)
        requested = req.max_completion_tokens or req.max_tokens
        param = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        message.max_tokens = self._invalid_counted(lambda: output_budget(requested, num_prompt_tokens, self.limits, param))
        choices = [Choice(m, num_prompt_tokens=num_prompt_tokens) for m in _samples(message, req.n)]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        parser = tool_parser(req.tools, req.tool_choice, settings.architecture)
        fmt = ChatFormatter(self.model, self.service.tokenizer, req.logprobs, include_usage, tool_parser=parser)
        return await self._respond(request, choices, fmt, req.stream, num_prompt_tokens, "messages", constraint_param(req))

    async def _counted(self, work):
        try:
            return await work
        except OpenAIError:
            self.metrics.error("invalid_argument")
            raise

    def _invalid_counted(self, build: Callable[[], Any]) -> Any:
        try:
            return build()
        except OpenAIError:
            self.metrics.error("invalid_argument")
            raise

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model:
            self.metrics.error("model_not_found")
            raise OpenAIError(404, f"the model {model!r} does not exist; this server serves {self.model!r}", param="model", code="model_not_found")

    async def _respond(
        self, request: Request, choices: list[Choice], fmt: Formatter, stream: bool, prompt_tokens: int, prompt_param: str,
        constraint_param: str | None = None,
    ) -> Response:
        try:
            if stream:
                events = await open_stream(self.service, choices, fmt, prompt_tokens,
                                           lambda e: sse(from_generate_error(e, prompt_param, constraint_param).body()))
                return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return await _unless_disconnected(request, self._whole(choices, fmt, prompt_tokens))
        except GenerateError as e:  # refused before the first token: its own status
            raise from_generate_error(e, prompt_param, constraint_param) from None

    async def _whole(self, choices: list[Choice], fmt: Formatter, prompt_tokens: int) -> Response:
        return JSONResponse(await whole(self.service, choices, fmt, prompt_tokens))


def _samples(message: gen_pb.GenerateRequest, n: int) -> list[gen_pb.GenerateRequest]:
    """``n`` requests for one prompt; with a seed, sample i is seeded seed + i, so that the n
    samples differ and the response is still reproducible."""
    if n == 1:
        return [message]
    samples = []
    for i in range(n):
        sample = gen_pb.GenerateRequest()
        sample.CopyFrom(message)
        if message.sampling.HasField("seed"):
            sample.sampling.seed = (message.sampling.seed + i) % 2**63
        samples.append(sample)
    return samples


async def _unless_disconnected(request: Request, work) -> Response:
    """Runs ``work`` unless the client leaves first; then it is cancelled (its KV freed on the workers)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        return Response(status_code=_CLIENT_CLOSED)
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error_response(e: OpenAIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def operator_check(client_keys: ApiKeys | None, worker_keys: ApiKeys | None, metrics) -> Callable:
    """The sleep-mode routes change which workers serve: they take the worker credential, never a
    client's key. A router with client keys and no worker keys serves them to nobody; a router
    without any keys (loopback, a laptop) leaves them open like everything else."""

    async def check(request: Request) -> None:
        if worker_keys is None and client_keys is None:
            return
        if worker_keys is None:
            metrics.error("unauthenticated")
            raise OpenAIError(403, f"{request.url.path} takes the worker credential, and this router has none (--worker-keys-file)",
                              code="permission_denied")
        key = bearer(request.headers.get("authorization"))
        if not worker_keys.check(key):
            metrics.error("unauthenticated")
            raise OpenAIError(401, f"{request.url.path} takes a worker key (a client's API key is not one)", code="invalid_api_key")

    return check


def build_app(service: GenerationService, keys: ApiKeys | None, is_serving: Callable[[], bool],
              worker_keys: ApiKeys | None = None) -> FastAPI:
    """``worker_keys``: the worker credential, which the sleep-mode routes take instead of a client's key."""
    routes = OpenAIRoutes(service, keys, is_serving)
    app = FastAPI(title="splitserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=service.settings.limits.max_request_bytes)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(routes.authenticate)])
    v1.add_api_route("/models", routes.list_models, methods=["GET"])
    v1.add_api_route("/models/{model:path}", routes.get_model, methods=["GET"])
    v1.add_api_route("/completions", routes.completions, methods=["POST"])
    v1.add_api_route("/chat/completions", routes.chat_completions, methods=["POST"])
    app.include_router(v1)
    app.add_api_route("/health", routes.health, methods=["GET"])
    tokens = TokenRoutes(service, routes._check_model)
    app.add_api_route("/tokenize", tokens.tokenize, methods=["POST"], dependencies=[Depends(routes.authenticate)])
    app.add_api_route("/detokenize", tokens.detokenize, methods=["POST"], dependencies=[Depends(routes.authenticate)])
    app.add_api_route("/version", tokens.get_version, methods=["GET"])
    app.add_api_route("/metrics", tokens.metrics, methods=["GET"])
    sleep = SleepRoutes(service.workers)
    auth = [Depends(operator_check(keys, worker_keys, routes.metrics))]
    app.add_api_route("/sleep", sleep.sleep, methods=["POST"], dependencies=auth)
    app.add_api_route("/wake_up", sleep.wake_up, methods=["POST"], dependencies=auth)
    app.add_api_route("/is_sleeping", sleep.is_sleeping, methods=["GET"], dependencies=auth)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, e: OpenAIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        return _error_response(OpenAIError(e.status_code, message, code=str(e.detail).lower().replace(" ", "_")))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error_response(OpenAIError(500, f"internal error: {type(e).__name__}", "server_error", code="internal_error"))

    return app
