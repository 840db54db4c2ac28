"""Tool calling on chat completions. The tools go to the checkpoint's chat template, which
renders them into the prompt; the output becomes OpenAI ``tool_calls`` with finish_reason
"tool_calls", whole or streamed: a named function's arguments as they are made, other calls
one delta each once the output is complete (tool_parsers.StreamSplitter).

- "auto" (the default with tools): the model decides; its family's format is parsed out of
  the text (tool_parsers.py).
- "required" or a named function: a grammar constrains the output to the calls' JSON, so it
  always parses: an array of one or more ``{"name": ..., "parameters": {...}}`` (each name one
  of the tools, its parameters that tool's schema), or the named function's arguments object.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from splitserve.services.router.openai.protocol import OpenAIError
from splitserve.services.router.openai.tool_parsers import Call, ToolParser, parser_for

ANY_OBJECT = {"type": "object"}


class RequiredCalls(ToolParser):
    """tool_choice "required" or named: the whole output is the calls' JSON (its grammar's)."""

    def __init__(self, function: str | None) -> None:
        self.function = function  # None: an array of {"name", "parameters"}; else that function's arguments

    def start(self, text: str) -> int | None:
        return 0

    def held(self, text: str) -> int:
        return len(text)

    def parse(self, text: str) -> tuple[str | None, list[Call]]:
        value = json.loads(text)
        if self.function is not None:
            return None, [{"name": self.function, "arguments": value}]
        return None, [{"name": item["name"], "arguments": item.get("parameters", {})} for item in value]


def openai_calls(calls: list[Call]) -> list[dict[str, Any]]:
    return [
        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
         "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
        for call in calls
    ]


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    functions = {}
    for i, tool in enumerate(tools):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise OpenAIError(400, f"tools.{i}: must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": ...}}}}", param=f"tools.{i}")
        parameters = function.get("parameters", ANY_OBJECT)
        if not isinstance(parameters, dict):
            raise OpenAIError(400, f"tools.{i}.function.parameters: must be a JSON schema object", param=f"tools.{i}.function.parameters")
        functions[function["name"]] = parameters
    return functions


def tool_parser(tools: list[dict[str, Any]] | None, tool_choice: Any, architecture: str) -> ToolParser | None:
    """How a chat completion's output becomes tool calls; None when no tool may be called."""
    if not tools or tool_choice == "none":
        return None
    if tool_choice in (None, "auto"):
        return parser_for(architecture)
    found = tool_constraint(tools, tool_choice)
    return RequiredCalls(found[0] if found else None)


def tool_constraint(tools: list[dict[str, Any]] | None, tool_choice: Any) -> tuple[str | None, str, str] | None:
    """(the named function or None, JSON schema text, the field it came from) when the tools
    must be called; None when the model decides ("auto") or may not call ("none", no tools).
    OpenAIError for what cannot be honoured."""
    if not tools or tool_choice == "none":
        return None
    functions = _functions(tools)
    if tool_choice in (None, "auto"):
        return None
    if tool_choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema}, "required": ["name", "parameters"]}
                 for name, schema in functions.items()]
        schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
        return None, json.dumps(schema), "tools"
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise OpenAIError(400, "tool_choice: must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                          param="tool_choice")
    if name not in functions:
        raise OpenAIError(400, f"tool_choice.function.name: {name!r} is not one of the tools", param="tool_choice.function.name")
    return name, json.dumps(functions[name]), "tools"
