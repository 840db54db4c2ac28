"""The benchmark's side of the public API: one grpc.aio channel to the router, and a
request function that turns a Generate stream into a RequestRecord. Proto messages stop
here; the rest of the benchmark sees only BenchRequest, RequestRecord and ModelInfo.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc

from splitserve.bench.datasets import BenchRequest
from splitserve.bench.records import RequestRecord, Usage
from splitserve.v1 import generation_pb2 as pb
from splitserve.v1 import generation_pb2_grpc as pb_grpc

# Client-side error codes, for failures the server did not report as a gRPC status.
NO_FINAL = "NO_FINAL"  # the stream ended cleanly without a Final message
NO_TOKENS = "NO_TOKENS"  # a Final came but no token did: there is no TTFT to measure
ABORTED = "ABORTED_BY_SERVER"  # Final with finish_reason ABORT


@dataclass(frozen=True)
class ModelInfo:
    model: str
    architecture: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_tokens_limit: int  # 0: the server set none beyond max_model_len
    block_size: int

    def effective_max_tokens(self) -> int:
        return self.max_tokens_limit or self.max_model_len


def _finish_reason(value: int) -> str:
    return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def _message(request: BenchRequest, request_id: str, ignore_eos: bool, sampling: Sequence[tuple[str, float]] = ()) -> pb.GenerateRequest:
    message = pb.GenerateRequest(request_id=request_id, max_tokens=request.max_tokens, ignore_eos=ignore_eos)
    if request.prompt_token_ids is not None:
        message.token_ids.ids.extend(request.prompt_token_ids)
    else:
        message.text = request.prompt_text
    for field, value in sampling:  # unset: the engine's default, greedy
        setattr(message.sampling, field, value)
    return message


class GenerationClient:
    """Async client for one target, or several routers of one platform (requests go to them in
    turn, one channel each). Use as ``async with GenerationClient(...) as c``."""

    def __init__(
        self, target: str | Sequence[str], request_timeout_s: float | None, ignore_eos: bool, sampling: Sequence[tuple[str, float]] = ()
    ) -> None:
        targets = [target] if isinstance(target, str) else list(target)
        # A benchmark measures the server, never a proxy picked up from the environment.
        self._channels = [grpc.aio.insecure_channel(t, options=[("grpc.enable_http_proxy", 0)]) for t in targets]
        self._all_stubs = [pb_grpc.GenerationStub(c) for c in self._channels]
        self._stubs = itertools.cycle(self._all_stubs)
        self._timeout = request_timeout_s
        self._ignore_eos = ignore_eos
        self._sampling = tuple(sampling)

    async def __aenter__(self) -> GenerationClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for channel in self._channels:
            await channel.close()

    async def model_info(self, wait_s: float) -> ModelInfo:
        """Waits up to ``wait_s`` for every target to come up; raises grpc.aio.AioRpcError, or
        ValueError when the targets serve different models."""
        infos = [await stub.GetModelInfo(pb.ModelInfoRequest(), timeout=wait_s, wait_for_ready=True) for stub in self._all_stubs]
        info = infos[0]
        if any(other.model != info.model for other in infos[1:]):
            raise ValueError(f"the targets serve different models: {sorted({i.model for i in infos})}")
        return ModelInfo(
            model=info.model,
            architecture=info.architecture,
            max_model_len=info.max_model_len,
            vocab_size=info.vocab_size,
            eos_token_ids=tuple(info.eos_token_ids),
            max_tokens_limit=info.max_tokens_limit,
            block_size=info.block_size,
        )

    async def generate(self, request: BenchRequest, request_id: str) -> RequestRecord:
        message = _message(request, request_id, self._ignore_eos, self._sampling)
        chunk_times: list[float] = []
        chunk_num_tokens: list[int] = []
        final: pb.Final | None = None
        error_code: str | None = None
        error_message: str | None = None
        send_time = time.perf_counter()
        call = next(self._stubs).Generate(message, timeout=self._timeout)
        try:
            async for response in call:
                now = time.perf_counter()
                kind = response.WhichOneof("kind")
                if kind == "delta" and response.delta.token_ids:
                    chunk_times.append(now)
                    chunk_num_tokens.append(len(response.delta.token_ids))
                elif kind == "final":
                    final = response.final
        except grpc.aio.AioRpcError as e:
            error_code, error_message = e.code().name, e.details()
        end_time = time.perf_counter()

        if error_code is None:
            if final is None:
                error_code, error_message = NO_FINAL, "the stream ended without a Final message"
            elif final.finish_reason == pb.FINISH_REASON_ABORT:
                error_code, error_message = ABORTED, "the server aborted the request"
            elif not chunk_times:
                error_code, error_message = NO_TOKENS, "the stream carried no token"
        usage = None
        if final is not None:
            usage = Usage(
                prompt_tokens=final.usage.prompt_tokens,
                completion_tokens=final.usage.completion_tokens,
                cached_prompt_tokens=final.usage.cached_prompt_tokens,
            )
        return RequestRecord(
            index=request.index,
            request_id=request_id,
            send_time=send_time,
            chunk_times=tuple(chunk_times),
            chunk_num_tokens=tuple(chunk_num_tokens),
            end_time=end_time,
            prompt_len=request.prompt_len,
            max_tokens=request.max_tokens,
            usage=usage,
            finish_reason=_finish_reason(final.finish_reason) if final is not None else None,
            error_code=error_code,
            error_message=error_message,
            injected_invalid=request.injected_invalid,
        )
