"""The public Generation service: route, prefill, hand off to decode, detokenize, stream back."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from prometheus_client import Counter
from transformers import PreTrainedTokenizerBase

from splitserve.engine.constraint import Constraint
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.grammar import GrammarCompiler
from splitserve.engine.prefix_hash import hash_request_tokens
from splitserve.logs import request_id_var
from splitserve.services.metrics import ServiceMetrics
from splitserve.services.router.decode_streams import DecodeFailed
from splitserve.services.router.detokenizer import IncrementalDetokenizer
from splitserve.services.router.request_input import ModelLimits, PreparedRequest, prepare
from splitserve.services.router.placement import Placer
from splitserve.services.router.routing import RoutingPolicy, should_skip_prefill
from splitserve.services.router.workers import WorkerDirectory
from splitserve.v1 import generation_pb2 as gen_pb
from splitserve.v1 import generation_pb2_grpc
from splitserve.v1 import worker_pb2 as worker_pb

log = logging.getLogger(__name__)

# Worker failures after which the request goes to another worker.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED)
PROMPT_TAIL_TOKENS = 4


class GenerateError(Exception):
    """Why a request was refused or failed: a gRPC status code and a message.

    ``field`` names the offending request field for INVALID_ARGUMENT. The gRPC servicer
    aborts with the code; the HTTP API maps it to a status (services/router/openai).
    """

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


@dataclass(frozen=True)
class RouterSettings:
    model_name: str
    architecture: str
    limits: ModelLimits
    block_size: int
    eos_token_ids: tuple[int, ...]
    prefill_threshold: int = 0  # prompts shorter than this are prefilled on the decode worker
    max_inflight: int = 1024
    trust_request_chat_template: bool = False  # chat requests may bring their own template (HTTP API)


@dataclass
class DecodeProgress:
    """What one request's stream has delivered so far (prefill's first token, then ``_decode``'s)."""

    num_tokens: int = 0  # output tokens sent to the client, the prefill worker's first one included
    num_cached: int = 0  # prompt tokens served from a prefix cache
    finish: int = gen_pb.FINISH_REASON_UNSPECIFIED
    taken: bool = False  # the decode worker answered: the prefill worker's KV is no longer the router's to release


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(
        self, settings: RouterSettings, tokenizer: PreTrainedTokenizerBase, workers: WorkerDirectory, policy: RoutingPolicy, metrics: ServiceMetrics,
        placer: Placer | None = None,
    ) -> None:
        self.placer = placer  # per-request placement (placement.py); None: every prompt long enough goes remote
        self.settings = settings
        self.tokenizer = tokenizer
        self.workers = workers
        self.policy = policy
        self.metrics = metrics
        self.series = metrics.frontend_series(settings.model_name)
        self._ttft, self._itl = self.series.ttft, self.series.itl  # observed per token
        self.num_inflight = 0
        self._grammars: GrammarCompiler | None = None
        self._grammars_lock = asyncio.Lock()
        self._merged_steps = Counter(
            "splitserve_router_merged_steps", "Engine steps of a request sent to its client in one message with an earlier "
            "step, because the client (or the router) fell behind", ["role"], registry=metrics.registry,
        ).labels("router")

    async def check_constraint(self, constraint: Constraint) -> None:
        """Compiles ``constraint`` on a thread (the workers find the same grammar valid); raises
        InvalidRequestError naming it. The compiler is built on first use and keeps a cache."""
        if self._grammars is None:
            async with self._grammars_lock:
                if self._grammars is None:
                    limits = self.settings.limits
                    self._grammars = await asyncio.to_thread(GrammarCompiler, self.tokenizer, limits.vocab_size, self.settings.eos_token_ids)
        await asyncio.to_thread(self._grammars.compile, constraint)

    async def pool_dtypes(self) -> dict[str, dict[str, str]]:
        """{"kv_cache_dtype": {role: dtype}, "quantization": {role: method}} over the live workers of each
        pool; a pool whose workers differ lists every value, comma-separated; a pool with none is left out."""
        out: dict[str, dict[str, str]] = {"kv_cache_dtype": {}, "quantization": {}}
        for role in ("prefill", "decode"):
            workers = await self.workers.live(role)
            for key, per_role in out.items():
                values = sorted({getattr(w.info, key) for w in workers if getattr(w.info, key)})
                if values:
                    per_role[role] = ",".join(values)
        return out

    async def GetModelInfo(self, request, context) -> gen_pb.ModelInfo:
        s = self.settings
        dtypes = await self.pool_dtypes()
        return gen_pb.ModelInfo(
            kv_cache_dtype=dtypes["kv_cache_dtype"],
            quantization=dtypes["quantization"],
            model=s.model_name,
            architecture=s.architecture,
            max_model_len=s.limits.max_model_len,
            vocab_size=s.limits.vocab_size,
            eos_token_ids=s.eos_token_ids,
            max_tokens_limit=s.limits.max_tokens_limit,
            block_size=s.block_size,
        )

    async def Generate(self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext):
        async with contextlib.aclosing(self.generate(request, context.time_remaining())) as stream:
            try:
                async for message in stream:
                    yield message
            except GenerateError as e:
                await context.abort(e.code, e.message)

    async def generate(self, request: gen_pb.GenerateRequest, timeout: float | None = None) -> AsyncIterator[gen_pb.GenerateResponse]:
        """The request path that the gRPC and HTTP APIs share: check, route, prefill, decode, detokenize.

        Yields Delta messages, then one Final; raises GenerateError. ``timeout`` is the
        caller's own deadline in seconds (the gRPC call's), on top of the request's.
        """
        start = time.perf_counter()  # arrival: end-to-end latency counts tokenizing
        if self.num_inflight >= self.settings.max_inflight:
            self.metrics.error("queue_full")
            raise GenerateError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.num_inflight} requests in flight; try again later")
        self.num_inflight += 1  # before prepare's await (a long prompt is tokenized on a thread): admission holds
        try:
            prepared = await prepare(request, self.tokenizer, self.settings.limits, self.check_constraint)
        except InvalidRequestError as e:
            self.num_inflight -= 1
            self.metrics.error("invalid_argument")
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, str(e), e.field) from None
        except BaseException:
            self.num_inflight -= 1
            raise
        # One deadline for the whole path, the earlier of the request's timeout_seconds and the
        # call's own. It ends each wait from inside (a worker call's timeout, a timer on the decode
        # stream), never by cancelling the task: a cancel landing while the stream is suspended in
        # a write to the client would skip this generator and leave the client without a status.
        limits = [t for t in (prepared.timeout_seconds, timeout) if t is not None]
        deadline = time.monotonic() + min(limits) if limits else None
        request_id_var.set(prepared.engine_request.request_id)
        outcome = "error"
        try:
            async for message in self._generate(prepared, deadline):
                yield message
            outcome = "ok"
            final = message.final
            reason = gen_pb.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower()
            self.series.finished(reason, final.usage.prompt_tokens, final.usage.completion_tokens, time.perf_counter() - start)
        except GenerateError as e:
            if e.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            outcome = "deadline"
            if prepared.timeout_seconds is not None and (timeout is None or prepared.timeout_seconds <= timeout):
                raise GenerateError(e.code, f"request timed out after {prepared.timeout_seconds}s") from None
            raise GenerateError(e.code, "the call's deadline passed") from None
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            self.num_inflight -= 1
            self.metrics.outcome(outcome)

    @staticmethod
    def _timeout(deadline: float | None) -> float | None:
        return None if deadline is None else max(deadline - time.monotonic(), 0.0)

    async def _prefill(self, prepared: PreparedRequest, block_hashes: list[bytes], deadline: float | None, placed=None):
        """Runs the prompt on a prefill worker, trying others when one is down.

        ``placed``: the workers placement chose, tried in that order (a mixed-role decode
        worker among them); None: the live prefill workers, as the routing policy ranks them.
        Returns (PrefillResponse, worker address) or None when there is no
        prefill worker left (the decode worker then prefills itself).
        """
        tried: set[str] = set()
        request = worker_pb.PrefillRequest(request=prepared.engine_request)
        while True:
            listed = placed if placed is not None else await self.workers.live("prefill")
            candidates = [w for w in listed if w.info.worker_id not in tried][: 1 if placed is not None else None]
            if not candidates:
                return None
            tiers = await self.workers.match_prefix_tiers(block_hashes, candidates)
            num_prompt = len(prepared.engine_request.prompt_token_ids)
            matches, host_matches = tiers if tiers is not None else (None, None)
            decision = self.policy.pick_prefill(block_hashes, candidates, matches, num_prompt, host_matches)
            log.info("prefill on %s (%s, %d cached tokens expected)", decision.worker_id, decision.reason, decision.num_cached_tokens)
            self.metrics.routing.labels("prefill", decision.policy, decision.reason).inc()
            try:
                with self.workers.index.track(decision.worker_id, block_hashes, num_prompt - decision.num_cached_tokens):
                    response = await self.workers.prefill_stub(decision.address).Prefill(request, timeout=self._timeout(deadline))
                return response, decision.address
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE:
                    raise GenerateError(e.code(), e.details()) from None
                log.warning("prefill worker %s failed (%s: %s); trying another", decision.worker_id, e.code().name, e.details())
                self.metrics.error("prefill_worker_failed")
                self.workers.mark_failed(decision.worker_id)
                tried.add(decision.worker_id)

    async def _generate(self, prepared: PreparedRequest, deadline: float | None):
        engine_request = prepared.engine_request
        prompt = list(engine_request.prompt_token_ids)
        block_hashes = hash_request_tokens(prompt, self.settings.block_size)
        start = time.perf_counter()
        detok = IncrementalDetokenizer(self.tokenizer, prepared.stop, prepared.skip_special_tokens, prompt[-PROMPT_TAIL_TOKENS:])
        progress = DecodeProgress()
        decode_request = worker_pb.DecodeRequest(request=engine_request)
        avoid = ""
        prefill = None
        if not should_skip_prefill(len(prompt), self.settings.prefill_threshold):
            placed = None
            if self.placer is not None:
                placed = await self.placer.place(self.workers, self.policy, block_hashes, len(prompt), engine_request.request_id)
            if self.placer is None or placed is not None:
                prefill = await self._prefill(prepared, block_hashes, deadline, placed)
        kv_pinned = prefill is not None and prefill[0].HasField("kv")  # on the prefill worker until decode takes it
        try:
            if prefill is not None:
                response, _ = prefill
                progress.num_tokens, progress.num_cached = 1, response.num_cached_tokens
                self._ttft.observe(time.perf_counter() - start)
                yield self._delta(detok, [response.first_token], engine_request.logprobs or engine_request.top_logprobs > 0, response.prompt_logprobs)
                progress.finish = gen_pb.FINISH_REASON_STOP if detok.matched_stop is not None else response.finish_reason
                if progress.finish != gen_pb.FINISH_REASON_UNSPECIFIED:
                    for message in self._finish(engine_request, prompt, progress, detok):
                        yield message
                    return
                decode_request = worker_pb.DecodeRequest(
                    request=engine_request, first_token=response.first_token, kv=response.kv, num_cached_tokens=progress.num_cached
                )
                avoid = response.kv.worker_id  # a mixed-role decode worker that prefilled it does not decode it too
            async for message in self._decode(decode_request, prepared, detok, deadline, start, progress, avoid):
                yield message
            for message in self._finish(engine_request, prompt, progress, detok):
                yield message
        finally:
            if kv_pinned and not progress.taken:
                # Decode never took the KV (it failed, or the client left): unpin it now, not at lease expiry.
                asyncio.ensure_future(self._release(prefill[1], engine_request.request_id))

    async def _decode(self, decode_request, prepared, detok, deadline, start, progress: DecodeProgress, avoid: str = ""):
        """Streams the decode worker's tokens as Delta responses, keeping ``progress`` current."""
        with_logprobs = prepared.engine_request.logprobs or prepared.engine_request.top_logprobs > 0
        first_from_decode = progress.num_tokens == 0
        num_blocks = -(-(len(prepared.engine_request.prompt_token_ids) + 1) // self.settings.block_size)
        decision, updates, batch = await self._open_decode(decode_request, prepared, num_blocks, deadline, avoid)
        last = time.perf_counter()
        tracked = self.workers.index.track(decision.worker_id, num_blocks=num_blocks)
        tracked.__enter__()
        try:
            while True:
                progress.taken = True
                now = time.perf_counter()
                if first_from_decode:
                    self._ttft.observe(now - start)
                    first_from_decode = False
                else:
                    self._itl.observe(now - last)
                last = now
                tokens = [t for update in batch for t in update.tokens]
                if len(tokens) > 1:  # one token per engine step: a client that keeps up gets one at a time
                    self._merged_steps.inc(len(tokens) - 1)
                progress.num_cached = max(progress.num_cached, *(u.num_cached_tokens for u in batch))
                # A stop string may end the output inside the batch; the tokens after it are not part of it.
                delta = self._delta(detok, tokens, with_logprobs, [t for update in batch for t in update.prompt_logprobs])
                progress.num_tokens += len(delta.delta.token_ids)
                if delta.delta.text or delta.delta.token_ids:
                    yield delta
                if detok.matched_stop is not None:
                    progress.finish = gen_pb.FINISH_REASON_STOP
                elif batch[-1].finish_reason != gen_pb.FINISH_REASON_UNSPECIFIED:
                    progress.finish = batch[-1].finish_reason
                if progress.finish != gen_pb.FINISH_REASON_UNSPECIFIED:
                    break
                # All that arrived since the last read, one message's worth to the client: when
                # the router falls behind, a request's tokens of several steps go out together.
                batch = await updates.next()
        except DecodeFailed as e:
            raise self._decode_error(e, decision) from None
        finally:
            tracked.__exit__(None, None, None)
            updates.cancel()  # a stop string ended it early, or the client left: the decode worker frees its blocks
        progress.taken = True

    async def _open_decode(self, decode_request, prepared, num_blocks: int, deadline: float | None, avoid: str = ""):
        """Starts the request on a decode worker and waits for its first updates.

        A worker that refuses it untouched (draining, or full) is set aside and another one
        gets it; the prefill worker's KV is still pinned for it. Returns (decision, updates,
        the first updates).
        """
        tried: set[str] = set()
        full = 0  # workers that refused it for a full queue
        while True:
            candidates = [w for w in await self.workers.live("decode") if w.info.worker_id not in tried]
            candidates = [w for w in candidates if w.info.worker_id != avoid] or candidates
            if not candidates:
                if full:
                    self.metrics.error("queue_full")
                    raise GenerateError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"every decode worker tried ({full}) is full; try again later")
                raise GenerateError(grpc.StatusCode.UNAVAILABLE, "no decode worker is available")
            decision = self.policy.pick_decode(candidates, num_blocks, prepared.engine_request.request_id.encode())
            log.info("decode on %s (%s)", decision.worker_id, decision.reason)
            self.metrics.routing.labels("decode", decision.policy, decision.reason).inc()
            try:
                updates = self.workers.decode_stream(decision.address).start(decode_request, self._timeout(deadline))
            except DecodeFailed as e:
                if not e.refused:
                    raise GenerateError(e.code, e.details) from None
                refusal = e
            else:
                try:
                    return decision, updates, await updates.next()
                except DecodeFailed as e:
                    updates.cancel()
                    if not (e.refused and e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)):
                        raise self._decode_error(e, decision) from None
                    refusal = e
                except BaseException:
                    updates.cancel()
                    raise
            log.info("decode worker %s refused the request (%s); trying another", decision.worker_id, refusal)
            if refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                full += 1  # busy, not broken: the next request may still go there
            else:
                self.workers.mark_failed(decision.worker_id)  # draining
            tried.add(decision.worker_id)

    def _decode_error(self, e: DecodeFailed, decision) -> GenerateError:
        if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return GenerateError(e.code, e.details)
        self.metrics.error("decode_worker_failed")
        if e.code != grpc.StatusCode.INVALID_ARGUMENT:  # the request's own fault is not the worker's
            self.workers.mark_failed(decision.worker_id)
        code = e.code if e.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED) else grpc.StatusCode.UNAVAILABLE
        return GenerateError(code, f"decode worker {decision.worker_id} failed: {e.code.name}: {e.details}")

    def _delta(self, detok: IncrementalDetokenizer, tokens, with_logprobs: bool, prompt_logprobs=()) -> gen_pb.GenerateResponse:
        """The text and tokens of ``tokens`` up to (and with) the one that completes a stop string."""
        ids = [t.token_id for t in tokens]
        text = detok.add(ids)
        if detok.matched_at is not None and detok.matched_at < len(ids):
            ids, tokens = ids[: detok.matched_at], tokens[: detok.matched_at]
        delta = gen_pb.Delta(text=text, token_ids=ids, logprobs=tokens if with_logprobs else [], prompt_logprobs=prompt_logprobs)
        return gen_pb.GenerateResponse(delta=delta)

    def _finish(self, engine_request, prompt, progress: DecodeProgress, detok) -> list[gen_pb.GenerateResponse]:
        """The held-back text, if any, then the Final message."""
        tail = detok.flush()
        messages = [gen_pb.GenerateResponse(delta=gen_pb.Delta(text=tail))] if tail else []
        usage = gen_pb.Usage(prompt_tokens=len(prompt), completion_tokens=progress.num_tokens, cached_prompt_tokens=progress.num_cached)
        final = gen_pb.Final(
            request_id=engine_request.request_id, finish_reason=progress.finish, stop=detok.matched_stop or "", usage=usage
        )
        return [*messages, gen_pb.GenerateResponse(final=final)]

    async def _release(self, address: str, request_id: str) -> None:
        try:
            await self.workers.prefill_stub(address).ReleaseKV(worker_pb.LeaseRequest(request_id=request_id), timeout=5)
        except grpc.aio.AioRpcError as e:
            log.warning("could not release KV of %s on %s: %s (its lease will expire)", request_id, address, e.code().name)
