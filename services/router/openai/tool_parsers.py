"""The tool-call formats of the supported model families, read out of a chat completion's text
when ``tool_choice`` is "auto" (the model decides whether to call).

- Hermes / Qwen 2.5-3: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one or more,
  after optional text.
- Llama 3.x: the whole answer is ``{"name": ..., "parameters": {...}}`` (optionally after
  ``<|python_tag|>``), several separated by ``;``.
- Mistral: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` after optional text.

Streaming: text is sent as it comes until a call may be starting (a prefix of the family's
marker is held back); from the marker on, the rest is collected and sent as ``tool_calls``
deltas, one per call, when the output ends. Text that turns out not to be a call is sent then.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

Call = dict[str, Any]  # {"name": str, "arguments": dict}


def _call(item: Any) -> Call | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return {"name": item["name"], "arguments": arguments} if isinstance(arguments, dict) else None


class ToolParser:
    """Splits a complete output into (content, calls); ``marker`` starts the calls."""

    marker = ""

    def parse(self, text: str) -> tuple[str | None, list[Call]]:
        raise NotImplementedError

    def start(self, text: str) -> int | None:
        """Where in ``text`` the calls may begin (None: nowhere yet)."""
        at = text.find(self.marker)
        return at if at >= 0 else None

    def held(self, text: str) -> int:
        """How many trailing characters of ``text`` could be the start of the marker."""
        for n in range(min(len(self.marker) - 1, len(text)), 0, -1):
            if self.marker.startswith(text[-n:]):
                return n
        return 0


class HermesParser(ToolParser):
    marker = "<tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text):
        at = text.find(self.marker)
        if at < 0:
            return text, []
        calls = []
        for body in self._CALL.findall(text[at:]):
            try:
                call = _call(json.loads(body))
            except ValueError:
                call = None
            if call is None:
                return text, []  # not a well-formed call: the text goes out as it is
            calls.append(call)
        return (text[:at].strip() or None), calls


class MistralParser(ToolParser):
    """Real Mistral tokenizers have [TOOL_CALLS] as a control token, which the detokenizer
    drops (skip_special_tokens): an answer that is only a JSON array of calls counts too."""

    marker = "[TOOL_CALLS]"

    def start(self, text):
        at = super().start(text)
        if at is not None:
            return at
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith("[{") else None

    def held(self, text):
        if text.strip() in ("", "["):
            return len(text)  # the start of the answer: a bare array may be coming
        return super().held(text)

    def parse(self, text):
        at = text.find(self.marker)
        body = text[at + len(self.marker):] if at >= 0 else text
        if at < 0 and not text.lstrip().startswith("[{"):
            return text, []
        try:
            items = json.loads(body.strip())
        except ValueError:
            return text, []
        calls = [_call(item) for item in (items if isinstance(items, list) else [items])]
        if not calls or any(c is None for c in calls):
            return text, []
        return (text[:at].strip() or None) if at >= 0 else None, calls


class Llama3JsonParser(ToolParser):
    marker = "<|python_tag|>"

    def start(self, text):
        stripped = text.lstrip()
        if not stripped:
            return None
        if stripped.startswith("{") or self.marker.startswith(stripped[: len(self.marker)]):
            return len(text) - len(stripped)  # the answer may be a call: hold it all
        return None

    def held(self, text):
        return len(text) if not text.strip() else 0  # leading whitespace: not decided yet

    def parse(self, text):
        body = text.strip().removeprefix(self.marker).strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        decoder = json.JSONDecoder()
        at = 0
        while at < len(body):
            try:
                item, end = decoder.raw_decode(body, at)
            except ValueError:
                return text, []
            call = _call(item)
            if call is None:
                return text, []
            calls.append(call)
            at = end
            while at < len(body) and body[at] in " \n\t;":
                at += 1
        return None, calls


PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser}
# The format each architecture's instruct checkpoints use.
ARCHITECTURE_PARSER = {"LlamaForCausalLM": "llama3_json", "Qwen2ForCausalLM": "hermes", "Qwen3ForCausalLM": "hermes", "MistralForCausalLM": "mistral"}


def parser_for(architecture: str) -> ToolParser:
    return PARSERS[ARCHITECTURE_PARSER.get(architecture, "hermes")]()


@dataclass
class StreamSplitter:
    """One streamed choice under a parser: ``feed`` returns the text that can go out now."""

    parser: ToolParser
    text: str = ""
    sent: int = 0  # characters of ``text`` already sent as content
    calling: bool = field(default=False)

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.calling:
            return ""
        start = self.parser.start(self.text[self.sent:])
        if start is not None:
            self.calling = True
            out, self.sent = self.text[self.sent : self.sent + start], self.sent + start
            return out
        end = len(self.text) - self.parser.held(self.text[self.sent:])
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[Call]]:
        """The content not yet sent, and the calls."""
        _content, calls = self.parser.parse(self.text)
        if not calls:
            return self.text[self.sent:], []
        return "", calls  # content before the marker went out already
