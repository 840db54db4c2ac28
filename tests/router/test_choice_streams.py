"""A response of several choices reads its choices' streams no faster than its client reads it.

The choices' streams are the router's request streams: a stream that is not read makes its
request's decode steps wait in the router and go out merged, as for one choice. Reading them
into an unbounded queue held every token for a client that did not read (and merged nothing).
"""
from __future__ import annotations

import asyncio

import pytest

from transformers import AutoTokenizer

from splitserve.services.router.openai.choices import _several
from splitserve.services.router.openai.responses import CompletionFormatter
from splitserve.v1 import generation_pb2 as gen_pb

TOKENS_PER_CHOICE = 200


def test_several_choices_are_read_only_as_fast_as_the_client_reads(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    taken = [0, 0, 0]  # messages each choice's stream has given up

    async def stream(index: int):
        for i in range(TOKENS_PER_CHOICE):
            taken[index] += 1
            yield gen_pb.GenerateResponse(delta=gen_pb.Delta(text="x", token_ids=[5]))
        taken[index] += 1
        yield gen_pb.GenerateResponse(final=gen_pb.Final(finish_reason=gen_pb.FINISH_REASON_LENGTH))

    async def run() -> list[str]:
        streams = [stream(i) for i in range(3)]
        firsts = [await anext(s) for s in streams]
        fmt = CompletionFormatter("m", tokenizer, False, False)
        events = _several(streams, firsts, fmt, 4, lambda e: "error")
        received = [await anext(events) for _ in range(5)]  # then the client stops reading
        await asyncio.sleep(0.5)  # the choices' streams could run to their ends meanwhile
        assert sum(taken) <= 5 + 2 * len(streams), taken  # read: what was sent, and at most a few messages each ahead
        received += [e async for e in events]  # the client reads again: everything arrives
        return received

    events = asyncio.run(run())
    assert sum(taken) == 3 * (TOKENS_PER_CHOICE + 1)
    assert sum(e.count('"text":"x"') for e in events) == 3 * TOKENS_PER_CHOICE and events[-1] == "data: [DONE]\n\n"


def test_a_choice_stream_that_breaks_ends_the_response_instead_of_hanging_it(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))

    async def good():
        for _ in range(3):
            yield gen_pb.GenerateResponse(delta=gen_pb.Delta(text="x", token_ids=[5]))
        yield gen_pb.GenerateResponse(final=gen_pb.Final(finish_reason=gen_pb.FINISH_REASON_LENGTH))

    async def broken():
        yield gen_pb.GenerateResponse(delta=gen_pb.Delta(text="x", token_ids=[5]))
        raise RuntimeError("a bug in the request path")

    async def run() -> None:
        streams = [good(), broken()]
        firsts = [await anext(s) for s in streams]
        events = _several(streams, firsts, CompletionFormatter("m", tokenizer, False, False), 4, lambda e: "error")
        await asyncio.wait_for(_drain(events), 10)

    async def _drain(events) -> None:
        async for _ in events:
            pass

    with pytest.raises(RuntimeError, match="a bug in the request path"):
        asyncio.run(run())
