"""The decode worker's Decode stream, spoken to directly as a router does: many requests on one
stream, each failing or being cancelled alone, and everything freed when the stream ends."""
from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

from splitserve.services.router.workers import DECODE_CHANNEL_OPTIONS
from splitserve.testing.cluster import Cluster, wait_until
from splitserve.v1 import generation_pb2 as gen_pb
from splitserve.v1 import worker_pb2 as worker_pb
from splitserve.v1 import worker_pb2_grpc

PROMPT = list(range(11, 50))


@pytest.fixture(scope="module")
def decode_only(e2e_model_dir):
    cluster = Cluster(e2e_model_dir, worker_args=["--num-blocks", "256"])
    cluster.add_workers(("decode", "decode-0"))
    yield cluster
    cluster.stop()


def _start(request_id: str, max_tokens: int = 40, prompt=PROMPT) -> worker_pb.DecodeCommand:
    request = worker_pb.EngineRequest(request_id=request_id, prompt_token_ids=prompt, max_tokens=max_tokens, ignore_eos=True)
    return worker_pb.DecodeCommand(start=worker_pb.DecodeRequest(request=request))


class Router:
    """One Decode stream, as the router holds it: commands go in whenever, updates come out by request."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=list(DECODE_CHANNEL_OPTIONS))
        self.commands: asyncio.Queue = asyncio.Queue()
        self.call = worker_pb2_grpc.DecodeWorkerStub(self.channel).Decode(self._outgoing(), timeout=120)
        self.tokens: dict[str, list[int]] = {}
        self.last: dict[str, worker_pb.DecodeUpdate] = {}

    async def _outgoing(self):
        while (command := await self.commands.get()) is not None:
            yield command

    async def read(self, until) -> None:
        """Reads updates until ``until()`` holds."""
        while not until():
            message = await self.call.read()
            assert message is not grpc.aio.EOF, "the stream ended early"
            for update in message.updates:
                self.tokens.setdefault(update.request_id, []).extend(t.token_id for t in update.tokens)
                self.last[update.request_id] = update

    def ended(self, request_id: str) -> bool:
        update = self.last.get(request_id)
        return update is not None and bool(update.finish_reason or update.error_code)

    async def close(self) -> None:
        await self.channel.close()


def _settled(cluster: Cluster) -> bool:
    s = cluster.workers[0].stats()
    return not (s.num_running or s.num_waiting) and s.num_free_blocks == s.num_total_blocks


def test_a_bad_request_fails_alone_and_the_others_on_the_stream_go_on(decode_only, greedy):
    async def run():
        router = Router(decode_only.workers[0].address)
        try:
            for command in (_start("good"), _start("too-long", max_tokens=100000), _start("bad-token", prompt=[1, 10**6])):
                router.commands.put_nowait(command)
            await router.read(lambda: all(router.ended(r) for r in ("good", "too-long", "bad-token")))
            return router.tokens, router.last
        finally:
            await router.close()

    tokens, last = asyncio.run(run())
    assert last["too-long"].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "max_tokens" in last["too-long"].error_message
    assert last["bad-token"].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert last["good"].finish_reason == gen_pb.FINISH_REASON_LENGTH
    assert tokens["good"] == greedy(PROMPT, 40)
    assert wait_until(lambda: _settled(decode_only))


def test_duplicate_request_id_on_a_stream_is_invalid_argument_and_ends_both(decode_only):
    """A router never sends one (it refuses a duplicate itself); a stream that does cannot tell
    the two apart in its updates, so both end, and nothing is left behind."""
    async def run():
        router = Router(decode_only.workers[0].address)
        try:
            router.commands.put_nowait(_start("twice", max_tokens=300))
            await router.read(lambda: "twice" in router.tokens)
            router.commands.put_nowait(_start("twice", max_tokens=300))
            await router.read(lambda: router.ended("twice"))
            return router.last["twice"]
        finally:
            await router.close()

    last = asyncio.run(run())
    assert last.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "twice" in last.error_message
    assert wait_until(lambda: _settled(decode_only))


def test_a_cancel_frees_one_request_and_the_rest_go_on(decode_only, greedy):
    async def run():
        router = Router(decode_only.workers[0].address)
        try:
            router.commands.put_nowait(_start("keep", max_tokens=60))
            router.commands.put_nowait(_start("drop", max_tokens=500))
            await router.read(lambda: len(router.tokens.get("drop", [])) >= 3)
            router.commands.put_nowait(worker_pb.DecodeCommand(cancel="drop"))
            await router.read(lambda: router.ended("keep"))
            dropped = len(router.tokens["drop"])
            await asyncio.sleep(0.5)
            return router.tokens, dropped, router.ended("drop")
        finally:
            await router.close()

    tokens, dropped, drop_ended = asyncio.run(run())
    assert tokens["keep"] == greedy(PROMPT, 60)
    assert dropped < 500 and not drop_ended
    assert wait_until(lambda: _settled(decode_only))


def test_the_stream_ending_frees_every_request_on_it(decode_only):
    """The router went away (its process died, or it cancelled the call): nothing stays on the worker."""
    async def run():
        router = Router(decode_only.workers[0].address)
        for i in range(3):
            router.commands.put_nowait(_start(f"orphan-{i}", max_tokens=500))
        await router.read(lambda: all(len(router.tokens.get(f"orphan-{i}", [])) >= 2 for i in range(3)))
        stats = decode_only.workers[0].stats()
        router.call.cancel()
        await router.close()
        return stats

    during = asyncio.run(run())
    assert during.num_running == 3
    assert wait_until(lambda: _settled(decode_only))


def test_a_draining_worker_refuses_new_requests_finishes_the_rest_and_stops_when_the_router_closes(e2e_model_dir, greedy):
    """SIGTERM: the worker says so on the stream, refuses what starts after that, finishes what
    is in flight, and ends when the router closes its side (so no write of the router's fails)."""
    cluster = Cluster(e2e_model_dir, worker_args=["--num-blocks", "256"])
    try:
        (decode,) = cluster.add_workers(("decode", "decode-0"))

        async def run():
            router = Router(decode.address)
            try:
                router.commands.put_nowait(_start("in-flight", max_tokens=300))
                await router.read(lambda: len(router.tokens.get("in-flight", [])) >= 2)
                decode.signal(signal.SIGTERM)
                while not (message := await router.call.read()).draining:
                    for update in message.updates:
                        router.tokens[update.request_id].extend(t.token_id for t in update.tokens)
                        router.last[update.request_id] = update
                router.commands.put_nowait(_start("late"))
                await router.read(lambda: router.ended("in-flight") and router.ended("late"))
                router.commands.put_nowait(None)  # done: close our side
                return router.tokens, router.last, await router.call.read(), await router.call.code()
            finally:
                await router.close()

        tokens, last, after, code = asyncio.run(run())
        assert tokens["in-flight"] == greedy(PROMPT, 300)
        assert last["late"].error_code == grpc.StatusCode.UNAVAILABLE.value[0] and "draining" in last["late"].error_message
        assert last["late"].refused  # untouched: the router sends it to another decode worker
        assert after is grpc.aio.EOF and code == grpc.StatusCode.OK
        assert decode.proc.wait(timeout=30) == 0
    finally:
        cluster.stop()
