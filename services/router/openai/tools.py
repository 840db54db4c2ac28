"""Tool calling on chat completions, with ``tool_choice`` "required" or a named function: the
output is constrained by a grammar to the calls' JSON, so it always parses.

"required": a JSON array of one or more ``{"name": ..., "parameters": {...}}``, each name one of
the tools and its parameters that tool's schema; a named function: that function's arguments
object. The parsed calls are answered as OpenAI ``tool_calls`` (whole, or streamed as one
delta per call once the output is complete) with finish_reason "tool_calls". The tools are
also given to the checkpoint's chat template, which renders them into the prompt.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from splitserve.services.router.openai.protocol import OpenAIError

ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class ToolMode:
    """How the output becomes tool calls: ``function`` None for "required" (an array of calls)."""

    function: str | None = None

    def calls(self, text: str) -> list[dict[str, Any]]:
        """The OpenAI tool_calls of a complete output (its grammar guarantees it parses)."""
        value = json.loads(text)
        items = [{"name": self.function, "parameters": value}] if self.function is not None else value
        return [
            {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": item["name"], "arguments": json.dumps(item.get("parameters", {}), ensure_ascii=False)}}
            for item in items
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


def tool_constraint(tools: list[dict[str, Any]] | None, tool_choice: Any) -> tuple[ToolMode, str, str] | None:
    """(mode, JSON schema text, the field it came from) when the tools must be called; None
    when they may not be ("none", or no tools). OpenAIError for what cannot be honoured."""
    if not tools or tool_choice == "none":
        return None
    functions = _functions(tools)
    if tool_choice in (None, "auto"):
        raise OpenAIError(400, "tool_choice: 'auto' is not supported by this server yet (its output parsers are not written): "
                          "send 'required' or a named function", param="tool_choice", code="unsupported_parameter")
    if tool_choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema}, "required": ["name", "parameters"]}
                 for name, schema in functions.items()]
        schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
        return ToolMode(None), json.dumps(schema), "tools"
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise OpenAIError(400, "tool_choice: must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                          param="tool_choice")
    if name not in functions:
        raise OpenAIError(400, f"tool_choice.function.name: {name!r} is not one of the tools", param="tool_choice.function.name")
    return ToolMode(name), json.dumps(functions[name]), "tools"
