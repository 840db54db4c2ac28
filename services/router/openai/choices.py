"""The choices of one OpenAI response, each a request down the shared path, whole or streamed.

One choice (the common case) streams straight from its request's messages: one SSE event per
message, and a message carries one engine step of the request while the client keeps up.
When the client falls behind, the writer waits, the request's later steps pile up in the
router, and the next message carries them all (``splitserve_router_merged_steps_total``).
Several choices (``n``, or a batch of prompts) run concurrently and their events interleave.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from splitserve.services.router.generation import GenerateError, GenerationService
from splitserve.services.router.openai.responses import DONE, ChatFormatter, ChoiceResult, Formatter, usage
from splitserve.v1 import generation_pb2 as gen_pb

ErrorEvent = Callable[[GenerateError], str]  # an error after the headers went out, as an SSE event


@dataclass(frozen=True)
class Choice:
    message: gen_pb.GenerateRequest  # None-free: prompt and max_tokens set
    echo: str = ""  # completions' echo: the prompt's text, sent before the output
    num_prompt_tokens: int = 0
    generate: bool = True  # False: max_tokens 0 with echo, the prompt alone
    first_token_id: int | None = None  # set when the prompt's logprobs are asked for: the token that has none
    output: bool = True  # False: run for the prompt's logprobs only (max_tokens 0); the one token made is dropped


def _no_output(choice: Choice) -> gen_pb.Final:
    return gen_pb.Final(finish_reason=gen_pb.FINISH_REASON_LENGTH, usage=gen_pb.Usage(prompt_tokens=choice.num_prompt_tokens))


def _messages(service: GenerationService, choice: Choice) -> AsyncIterator[gen_pb.GenerateResponse]:
    """The choice's messages: its request's own stream (no extra hop per message), or that
    stream behind the echoed prompt."""
    if not choice.echo and choice.generate:
        return service.generate(choice.message)
    return _echoed(service, choice)


async def _echoed(service: GenerationService, choice: Choice) -> AsyncIterator[gen_pb.GenerateResponse]:
    if choice.echo:
        yield gen_pb.GenerateResponse(delta=gen_pb.Delta(text=choice.echo))
    if not choice.generate:
        yield gen_pb.GenerateResponse(final=_no_output(choice))
        return
    async with contextlib.aclosing(service.generate(choice.message)) as stream:
        async for message in stream:
            yield message


async def whole(service: GenerationService, choices: list[Choice], fmt: Formatter, prompt_tokens: int) -> dict:
    """The response body once every choice has finished; raises GenerateError for the first that failed."""

    async def collect(choice: Choice) -> ChoiceResult:
        result = ChoiceResult()
        if choice.first_token_id is not None:
            result.prompt_logprobs.append(gen_pb.TokenLogprob(token_id=choice.first_token_id))
        async with contextlib.aclosing(_messages(service, choice)) as stream:
            async for m in stream:
                if m.HasField("delta"):
                    result.prompt_logprobs.extend(m.delta.prompt_logprobs)
                    if choice.output:
                        result.text.append(m.delta.text)
                        result.tokens.extend(m.delta.logprobs)
                else:
                    result.final = m.final
        if not choice.output:
            result.text, result.final = [choice.echo], _no_output(choice)
        return result

    if len(choices) == 1:
        results = [await collect(choices[0])]
    else:
        tasks = [asyncio.ensure_future(collect(c)) for c in choices]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one failed: the others stop (their KV freed on the workers)
                task.cancel()
    return fmt.whole(results, usage([r.final for r in results], prompt_tokens))


async def open_stream(service: GenerationService, choices: list[Choice], fmt: Formatter, prompt_tokens: int, error_event: ErrorEvent) -> AsyncIterator[str]:
    """Waits for every choice's first message, so that a refusal still gets its own HTTP status
    (raises GenerateError), then returns the SSE events of the whole response."""
    streams = [_messages(service, c) for c in choices]
    try:
        firsts = [await anext(s) for s in streams] if len(streams) == 1 else await asyncio.gather(*(anext(s) for s in streams))
    except BaseException:
        for s in streams:
            await s.aclose()
        raise
    if len(streams) == 1:
        return _one(streams[0], firsts[0], fmt, error_event)
    return _several(streams, firsts, fmt, prompt_tokens, error_event)


async def _one(stream: AsyncIterator, message: gen_pb.GenerateResponse | None, fmt: Formatter, error_event: ErrorEvent) -> AsyncIterator[str]:
    async with contextlib.aclosing(stream):
        if isinstance(fmt, ChatFormatter):
            yield fmt.role_event()
        try:
            while message is not None:
                if message.HasField("delta"):
                    if (event := fmt.delta_event(message.delta)) is not None:
                        yield event
                else:
                    yield fmt.finish_event(message.final)
                    if fmt.include_usage:
                        yield fmt.usage_event(usage([message.final]))
                message = await anext(stream, None)
        except GenerateError as e:  # headers are gone: the error travels as an event
            yield error_event(e)
    yield DONE


async def _several(streams: list, firsts: list, fmt: Formatter, prompt_tokens: int, error_event: ErrorEvent) -> AsyncIterator[str]:
    # Bounded: a client that reads slowly must slow the choices' streams down, so that their steps
    # wait and merge in the router (one event for several tokens) as with one choice; an
    # unbounded queue read every stream as fast as it came and held all of it for the client.
    queue: asyncio.Queue[tuple[int, gen_pb.GenerateResponse | Exception | None]] = asyncio.Queue(maxsize=len(streams))

    async def pump(index: int, stream: AsyncIterator) -> None:
        async with contextlib.aclosing(stream):
            try:
                async for message in stream:
                    await queue.put((index, message))
            except Exception as e:  # noqa: BLE001 -- handed to the response, which ends with it (a bug must not hang it)
                await queue.put((index, e))
        await queue.put((index, None))

    for index, first in enumerate(firsts):
        queue.put_nowait((index, first))
    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    finals: list[gen_pb.Final] = []
    try:
        if isinstance(fmt, ChatFormatter):
            for index in range(len(streams)):
                yield fmt.role_event(index)
        open_ = len(streams)
        while open_:
            index, item = await queue.get()
            if item is None:
                open_ -= 1
            elif isinstance(item, GenerateError):
                yield error_event(item)
                break
            elif isinstance(item, Exception):
                raise item
            elif item.HasField("delta"):
                if (event := fmt.delta_event(item.delta, index)) is not None:
                    yield event
            else:
                finals.append(item.final)
                yield fmt.finish_event(item.final, index)
        else:
            if fmt.include_usage:
                yield fmt.usage_event(usage(finals, prompt_tokens))
    finally:
        for task in tasks:
            task.cancel()
    yield DONE
