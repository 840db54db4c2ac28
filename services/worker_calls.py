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
from splitserve.services.worker import WorkerRuntime
from splitserve.v1 import worker_pb2 as worker_pb


async def accept(engine_request: worker_pb.EngineRequest, context) -> tuple[str, list[int], SamplingParams]:
    """The request id (also set for the logs), the prompt and validated sampling parameters."""
    request_id_var.set(engine_request.request_id)
    try:
        params = sampling_params_from_proto(engine_request)
    except InvalidRequestError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    return engine_request.request_id, list(engine_request.prompt_token_ids), params


async def run_engine_request(runtime: WorkerRuntime, context, submit):
    """Submits through ``submit()`` and maps engine errors to gRPC statuses; returns the stream."""
    try:
        return submit()
    except InvalidRequestError as e:
        runtime.metrics.error("invalid_argument")
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except QueueFullError as e:
        runtime.metrics.error("queue_full")
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    except RuntimeError as e:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))


async def next_output(stream: asyncio.Queue, context):
    item = await stream.get()
    if isinstance(item, InvalidRequestError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
    if isinstance(item, QueueFullError):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(item))
    if isinstance(item, RankFailedError):  # the worker is going down; another one can serve the request
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(item))
    if isinstance(item, BaseException):
        await context.abort(grpc.StatusCode.INTERNAL, f"engine failed: {item}")
    return item
