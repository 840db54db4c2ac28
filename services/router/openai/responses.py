"""The router's Delta and Final messages -> OpenAI response bodies, whole or as stream chunks."""
from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from splitserve.v1 import generation_pb2 as gen_pb

FINISH_REASONS = {gen_pb.FINISH_REASON_STOP: "stop", gen_pb.FINISH_REASON_LENGTH: "length", gen_pb.FINISH_REASON_ABORT: "abort"}


def usage(final: gen_pb.Final) -> dict[str, Any]:
    u = final.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    }


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

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _body(self, obj: str, choices: list[dict], usage_: dict | None = None, stream: bool = False) -> dict[str, Any]:
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if not stream or self.include_usage:
            body["usage"] = usage_
        return body

    def whole(self, text: str, tokens: Sequence[gen_pb.TokenLogprob], final: gen_pb.Final) -> dict[str, Any]:
        finish = FINISH_REASONS.get(final.finish_reason)
        return self._body(self.object_name, [self._choice(text, tokens, finish, whole=True)], usage(final))

    def chunk(self, delta: gen_pb.Delta) -> dict[str, Any] | None:
        """The chunk for one Delta, or None when it has nothing to send yet (text held back)."""
        if not delta.text and not (self.with_logprobs and delta.logprobs):
            return None
        return self._body(self.chunk_object_name, [self._choice(delta.text, delta.logprobs, None, whole=False)], stream=True)

    def final_chunks(self, final: gen_pb.Final) -> list[dict[str, Any]]:
        finish = FINISH_REASONS.get(final.finish_reason)
        chunks = [self._body(self.chunk_object_name, [self._choice("", [], finish, whole=False, last=True)], stream=True)]
        if self.include_usage:
            chunks.append(self._body(self.chunk_object_name, [], usage(final), stream=True))
        return chunks

    def _choice(self, text: str, tokens, finish: str | None, whole: bool, last: bool = False) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormatter(Formatter):
    id_prefix, object_name, chunk_object_name = "cmpl", "text_completion", "text_completion"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.text_offset = 0

    def _choice(self, text, tokens, finish, whole, last=False):
        logprobs = self._logprobs(tokens) if self.with_logprobs and not last else None
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def _logprobs(self, tokens: Sequence[gen_pb.TokenLogprob]) -> dict[str, Any]:
        strings = [self.token_text(t.token_id) for t in tokens]
        offsets = []
        for s in strings:
            offsets.append(self.text_offset)
            self.text_offset += len(s)
        return {
            "tokens": strings,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{self.token_text(a.token_id): a.logprob for a in t.top} for t in tokens],
            "text_offset": offsets,
        }


class ChatFormatter(Formatter):
    id_prefix, object_name, chunk_object_name = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent_role = False

    def first_chunk(self) -> dict[str, Any]:
        """Streams open with the assistant's role, as OpenAI's do."""
        self.sent_role = True
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._body(self.chunk_object_name, [choice], stream=True)

    def _choice(self, text, tokens, finish, whole, last=False):
        logprobs = {"content": [self._entry(t) for t in tokens]} if self.with_logprobs and not last else None
        if whole:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish}
        return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": logprobs, "finish_reason": finish}

    def _entry(self, t: gen_pb.TokenLogprob) -> dict[str, Any]:
        s = self.token_text(t.token_id)
        top = [{"token": (a_s := self.token_text(a.token_id)), "logprob": a.logprob, "bytes": list(a_s.encode())} for a in t.top]
        return {"token": s, "logprob": t.logprob, "bytes": list(s.encode()), "top_logprobs": top}
