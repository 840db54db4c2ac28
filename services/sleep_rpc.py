"""The Sleep and Wake RPCs both worker services serve, over the worker's SleepController."""
from __future__ import annotations

import grpc
from splitserve.services.sleep import SleepOutcome, SleepStateError

from splitserve.v1 import worker_pb2 as worker_pb


class SleepRPCs:
    """Mixed into a worker servicer that has ``self.runtime``."""

    async def Sleep(self, request: worker_pb.SleepRequest, context) -> worker_pb.SleepResponse:
        if request.level not in (1, 2):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"level must be 1 or 2, got {request.level}")
        if not request.drain_seconds >= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"drain_seconds must not be negative, got {request.drain_seconds}")
        try:
            return _response(await self.runtime.sleep_mode.sleep(request.level, request.drain_seconds))
        except SleepStateError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    async def Wake(self, request: worker_pb.WakeRequest, context) -> worker_pb.SleepResponse:
        try:
            return _response(await self.runtime.sleep_mode.wake())
        except SleepStateError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))


def _response(outcome: SleepOutcome) -> worker_pb.SleepResponse:
    return worker_pb.SleepResponse(level=outcome.level, seconds=outcome.seconds, num_ended=outcome.num_ended)
