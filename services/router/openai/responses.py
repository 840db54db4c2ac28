"""The router's Delta and Final messages -> OpenAI response bodies, whole or as SSE events.

A response has one choice per prompt and sample (``n``), ``index = prompt * n + sample`` as
vLLM numbers them. Streamed text chunks without logprobs, one per engine step per request, are
the hot path: their JSON is a template filled with the one string that changes.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from splitserve.services.router.openai.tool_parsers import StreamSplitter, ToolParser
from splitserve.services.router.openai.tools import RequiredCalls, openai_calls
from splitserve.v1 import generation_pb2 as gen_pb

FINISH_REASONS = {gen_pb.FINISH_REASON_STOP: "stop", gen_pb.FINISH_REASON_LENGTH: "length", gen_pb.FINISH_REASON_ABORT: "abort"}
DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(finals: Sequence[gen_pb.Final], prompt_tokens: int | None = None) -> dict[str, Any]:
    """Summed over choices; ``prompt_tokens``: counted once per prompt, not per sample."""
    completion = sum(f.usage.completion_tokens for f in finals)
    prompt = sum(f.usage.prompt_tokens for f in finals) if prompt_tokens is None else prompt_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(f.usage.cached_prompt_tokens for f in finals)},
    }


@dataclass
class ChoiceResult:
    """One choice of a whole (non-streamed) response, as collected from its stream."""

    text: list[str] = field(default_factory=list)
    tokens: list[gen_pb.TokenLogprob] = field(default_factory=list)
    final: gen_pb.Final | None = None
    prompt_logprobs: list[gen_pb.TokenLogprob] = field(default_factory=list)  # the prompt's first token's is a placeholder


class Formatter:
    """One response's id, model and logprob rendering; subclasses give the choice shapes."""

    id_prefix = object_name = chunk_object_name = ""

    def __init__(self, model: str, tokenizer: PreTrainedTokenizerBase, with_logprobs: bool, include_usage: bool = False) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.tokenizer = tokenizer
        self.with_logprobs = with_logprobs
        self.include_usage = include_usage  # streams: a last chunk with usage and no choices
        # A text chunk's event is _head + its choice (_text_template) + _tail.
        head = {"id": self.id, "object": self.chunk_object_name, "created": self.created, "model": self.model, "choices": []}
        self._head = "data: " + json.dumps(head, ensure_ascii=False, separators=(",", ":")).removesuffix("]}")
        self._tail = '],"usage":null}\n\n' if include_usage else "]}\n\n"

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _body(self, obj: str, choices: list[dict], usage_: dict | None = None, stream: bool = False) -> dict[str, Any]:
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if not stream or self.include_usage:
            body["usage"] = usage_
        return body

    def whole(self, choices: Sequence[ChoiceResult], usage_: dict[str, Any]) -> dict[str, Any]:
        return self._body(self.object_name, [self._whole_choice(i, c) for i, c in enumerate(choices)], usage_)

    def _whole_choice(self, index: int, c: ChoiceResult) -> dict[str, Any]:
        return self._choice(index, "".join(c.text), c.tokens, FINISH_REASONS.get(c.final.finish_reason), whole=True)

    def delta_event(self, delta: gen_pb.Delta, index: int = 0) -> str | None:
        """The SSE event for one Delta, or None when it has nothing to send yet (text held back)."""
        if self.with_logprobs and delta.logprobs:
            return sse(self._body(self.chunk_object_name, [self._choice(index, delta.text, delta.logprobs, None, whole=False)], stream=True))
        if not delta.text:
            return None
        text = json.dumps(delta.text, ensure_ascii=False)
        return f"{self._head}{self._text_template(index, text)}{self._tail}"

    def _text_template(self, index: int, text_json: str) -> str:
        """The choice of a streamed text chunk without logprobs, ``text_json`` already JSON."""
        raise NotImplementedError

    def finish_event(self, final: gen_pb.Final, index: int = 0) -> str:
        choice = self._choice(index, "", [], FINISH_REASONS.get(final.finish_reason), whole=False, last=True)
        return sse(self._body(self.chunk_object_name, [choice], stream=True))

    def usage_event(self, usage_: dict[str, Any]) -> str:
        return sse(self._body(self.chunk_object_name, [], usage_, stream=True))

    def _choice(self, index: int, text: str, tokens, finish: str | None, whole: bool, last: bool = False) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormatter(Formatter):
    id_prefix, object_name, chunk_object_name = "cmpl", "text_completion", "text_completion"

    def __init__(self, *args, echo_logprobs: bool = False, prompt_logprobs: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.text_offsets: dict[int, int] = {}  # per choice: characters of text before the next token
        self.echo_logprobs = echo_logprobs  # echo with logprobs: the prompt's tokens lead the logprobs
        self.prompt_logprobs = prompt_logprobs  # vLLM's prompt_logprobs field in each choice

    def _whole_choice(self, index, c):
        if self.echo_logprobs and c.prompt_logprobs:
            c.tokens = [*c.prompt_logprobs, *c.tokens]
        choice = self._choice(index, "".join(c.text), c.tokens, FINISH_REASONS.get(c.final.finish_reason), whole=True,
                              first_is_none=self.echo_logprobs and bool(c.prompt_logprobs))
        if self.prompt_logprobs:
            choice["prompt_logprobs"] = [None, *(self._prompt_entry(t) for t in c.prompt_logprobs[1:])] if c.prompt_logprobs else None
        return choice

    def _prompt_entry(self, t: gen_pb.TokenLogprob) -> dict[str, Any]:
        """vLLM's shape: {token id: {logprob, rank, decoded_token}}, the prompt's token and the top ones."""
        entry = {str(t.token_id): {"logprob": t.logprob, "rank": None, "decoded_token": self.token_text(t.token_id)}}
        for rank, a in enumerate(t.top, 1):
            entry[str(a.token_id)] = {"logprob": a.logprob, "rank": rank, "decoded_token": self.token_text(a.token_id)}
        return entry

    def _text_template(self, index, text_json):
        return f'{{"index":{index},"text":{text_json},"logprobs":null,"finish_reason":null}}'

    def _choice(self, index, text, tokens, finish, whole, last=False, first_is_none=False):
        logprobs = self.logprobs(index, tokens, first_is_none) if self.with_logprobs and not last else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def logprobs(self, index: int, tokens: Sequence[gen_pb.TokenLogprob], first_is_none: bool = False) -> dict[str, Any]:
        """``first_is_none``: an echoed prompt's first token, which has no logprob (None, as in vLLM)."""
        strings = [self.token_text(t.token_id) for t in tokens]
        offset = self.text_offsets.get(index, 0)
        offsets = []
        for s in strings:
            offsets.append(offset)
            offset += len(s)
        self.text_offsets[index] = offset
        token_logprobs: list[float | None] = [t.logprob for t in tokens]
        top: list[dict[str, float] | None] = [{self.token_text(a.token_id): a.logprob for a in t.top} for t in tokens]
        if first_is_none and tokens:
            token_logprobs[0], top[0] = None, None
        return {"tokens": strings, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


class ChatFormatter(Formatter):
    id_prefix, object_name, chunk_object_name = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, *args, tool_parser: ToolParser | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tool_parser = tool_parser  # the output may hold tool calls (services/router/openai/tools.py)
        self._splitters: dict[int, StreamSplitter] = {}
        self._call_ids: dict[int, str] = {}  # a named function's call, streamed as its arguments come

    def _whole_choice(self, index, c):
        if self.tool_parser is None or c.final.finish_reason != gen_pb.FINISH_REASON_STOP:
            return super()._whole_choice(index, c)
        content, calls = self.tool_parser.parse("".join(c.text))
        if not calls:
            return super()._whole_choice(index, c)
        message = {"role": "assistant", "content": content, "tool_calls": openai_calls(calls)}
        logprobs = {"content": [self._entry(t) for t in c.tokens]} if self.with_logprobs else None
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": "tool_calls"}

    def delta_event(self, delta, index=0):
        if self.tool_parser is None:
            return super().delta_event(delta, index)
        if isinstance(self.tool_parser, RequiredCalls) and self.tool_parser.function is not None:
            return self._arguments_event(delta, index)
        splitter = self._splitters.setdefault(index, StreamSplitter(self.tool_parser))
        text = splitter.feed(delta.text)
        logprobs = delta.logprobs if self.with_logprobs else []
        if not text and not logprobs:
            return None
        return sse(self._body(self.chunk_object_name, [self._choice(index, text, logprobs, None, whole=False)], stream=True))

    def _arguments_event(self, delta, index: int) -> str | None:
        """A named function's output is its arguments' JSON: each delta of it goes out as an
        arguments fragment, the first with the call's id and name (as OpenAI streams calls)."""
        if not delta.text:
            return None
        call: dict[str, Any] = {"index": 0, "function": {"arguments": delta.text}}
        if index not in self._call_ids:
            self._call_ids[index] = f"call_{uuid.uuid4().hex[:24]}"
            call = {"index": 0, "id": self._call_ids[index], "type": "function",
                    "function": {"name": self.tool_parser.function, "arguments": delta.text}}
        choice = {"index": index, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}
        return sse(self._body(self.chunk_object_name, [choice], stream=True))

    def finish_event(self, final, index=0):
        if self._call_ids.pop(index, None) is not None:  # its arguments went out already
            if final.finish_reason != gen_pb.FINISH_REASON_STOP:
                return super().finish_event(final, index)
            last = {"index": index, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
            return sse(self._body(self.chunk_object_name, [last], stream=True))
        splitter = self._splitters.pop(index, None)
        if splitter is None:
            return super().finish_event(final, index)
        rest, calls = splitter.finish() if final.finish_reason == gen_pb.FINISH_REASON_STOP else (splitter.text[splitter.sent:], [])
        events = []
        if rest:
            events.append(sse(self._body(self.chunk_object_name, [self._choice(index, rest, [], None, whole=False)], stream=True)))
        for i, call in enumerate(openai_calls(calls)):
            delta = {"tool_calls": [{"index": i, **call}]}
            events.append(sse(self._body(self.chunk_object_name, [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}], stream=True)))
        if not calls:
            return "".join(events) + super().finish_event(final, index)
        last = {"index": index, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
        return "".join(events) + sse(self._body(self.chunk_object_name, [last], stream=True))

    def role_event(self, index: int = 0) -> str:
        """Streams open with the assistant's role, as OpenAI's do."""
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return sse(self._body(self.chunk_object_name, [choice], stream=True))

    def _text_template(self, index, text_json):
        return f'{{"index":{index},"delta":{{"content":{text_json}}},"logprobs":null,"finish_reason":null}}'

    def _choice(self, index, text, tokens, finish, whole, last=False):
        logprobs = {"content": [self._entry(t) for t in tokens]} if self.with_logprobs and not last else None
        if whole:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs, "finish_reason": finish}

    def _entry(self, t: gen_pb.TokenLogprob) -> dict[str, Any]:
        s = self.token_text(t.token_id)
        top = [{"token": (a_s := self.token_text(a.token_id)), "logprob": a.logprob, "bytes": list(a_s.encode())} for a in t.top]
        return {"token": s, "logprob": t.logprob, "bytes": list(s.encode()), "top_logprobs": top}
