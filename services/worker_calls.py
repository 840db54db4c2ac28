"""What both worker services do with an incoming request: check it, submit it, read its outputs.

Engine errors become gRPC statuses here, so the servicers stay thin.
"""
from __future__ import annotations

import asyncio

import grpc

from splitserve.engine.errors import InvalidRequestError, QueueFullError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.logs import request_id_var
from splitserve.parallel import RankFailedError
from splitserve.services.convert import sampling_params_from_proto
from splitserve.services.sleep import WorkerAsleepError
from splitserve.services.worker import WorkerRuntime
from splitserve.v1 import worker_pb2 as worker_pb


class RequestFailed(Exception):
    """One request's failure as a gRPC status: the call aborts with it, or a stream reports it for that request alone."""

    def __init__(self, code: grpc.StatusCode, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.refused = refused  # nothing was done with it yet (a decode worker's refusal: the router may go elsewhere)


def engine_error_status(error: BaseException, default: grpc.StatusCode) -> RequestFailed:
    """The status an engine error maps to: the request's own fault, a full queue, a worker going down, else ``default``."""
    if isinstance(error, InvalidRequestError):
        return RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, QueueFullError):
        return RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    if isinstance(error, (RankFailedError, WorkerAsleepError)):  # the worker is going down or to sleep; another one can serve it
        return RequestFailed(grpc.StatusCode.UNAVAILABLE, str(error))
    if default == grpc.StatusCode.INTERNAL:
        return RequestFailed(default, f"engine failed: {error}")
    return RequestFailed(default, str(error))


def parse(engine_request: worker_pb.EngineRequest) -> tuple[str, list[int], SamplingParams]:
    """The request id (also set for the logs), the prompt and validated sampling parameters; raises RequestFailed."""
    request_id_var.set(engine_request.request_id)
    try:
        params = sampling_params_from_proto(engine_request)
    except InvalidRequestError as e:
        raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    return engine_request.request_id, list(engine_request.prompt_token_ids), params


def submit(runtime: WorkerRuntime, submit_call):
    """Runs ``submit_call()`` (an EngineLoop.submit) and maps its refusals to RequestFailed; returns the stream."""
    try:
        return submit_call()
    except (InvalidRequestError, QueueFullError) as e:
        failure = engine_error_status(e, grpc.StatusCode.UNAVAILABLE)
        runtime.metrics.error("invalid_argument" if isinstance(e, InvalidRequestError) else "queue_full")
        raise failure from None
    except RuntimeError as e:  # the engine has failed
        raise RequestFailed(grpc.StatusCode.UNAVAILABLE, str(e)) from None


async def compile_constraint(runtime: WorkerRuntime, params: SamplingParams) -> None:
    """Compiles a constrained request's grammar off the event loop; raises RequestFailed (INVALID_ARGUMENT)."""
    try:
        await runtime.loop.compile_constraint(params)
    except InvalidRequestError as e:
        runtime.metrics.error("invalid_argument")
        raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None


async def accept(engine_request: worker_pb.EngineRequest, context, runtime: WorkerRuntime | None = None) -> tuple[str, list[int], SamplingParams]:
    """``parse`` (and, given ``runtime``, ``compile_constraint``) for a unary call: a bad
    request aborts it with INVALID_ARGUMENT."""
    try:
        request_id, prompt, params = parse(engine_request)
        if runtime is not None:
            await compile_constraint(runtime, params)
        return request_id, prompt, params
    except RequestFailed as e:
        await context.abort(e.code, e.message)


async def run_engine_request(runtime: WorkerRuntime, context, submit_call):
    """``submit`` for a unary call: a refusal aborts it with its status."""
    try:
        return submit(runtime, submit_call)
    except RequestFailed as e:
        await context.abort(e.code, e.message)


async def next_output(stream: asyncio.Queue, context):
    item = await stream.get()
    if isinstance(item, BaseException):
        failure = engine_error_status(item, grpc.StatusCode.INTERNAL)
        await context.abort(failure.code, failure.message)
    return item
