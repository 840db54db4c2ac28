"""OpenAI's ``response_format`` and vLLM's ``structured_outputs`` (and its older ``guided_*``
fields, removed in vLLM 0.12 but still sent by many clients) -> the request's Constraint.

At most one of them per request. Whether a schema, regex or grammar compiles is checked on the
shared path (``GenerationService.check_constraint``); its error names the OpenAI field here.
"""
from __future__ import annotations

import json
from typing import Any

from splitserve.services.router.openai.protocol import OpenAIError, OpenAIRequest
from splitserve.v1 import generation_pb2 as gen_pb

_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _bad(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param)


def _schema_text(schema: Any, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise _bad(param, f"is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise _bad(param, f"must be a JSON schema object, got {type(schema).__name__}")
    return json.dumps(schema)


def _from_response_format(fmt: dict[str, Any]) -> tuple[gen_pb.Constraint, str] | None:
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return gen_pb.Constraint(json_object=True), "response_format"
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise _bad("response_format.json_schema", "must be an object with a schema")
        schema = spec.get("schema", spec.get("json_schema"))
        if schema is None:
            raise _bad("response_format.json_schema.schema", "is required")
        param = "response_format.json_schema.schema"
        return gen_pb.Constraint(json_schema=_schema_text(schema, param)), param
    raise OpenAIError(400, f"response_format.type: must be text, json_object or json_schema, got {kind!r}",
                      param="response_format.type", code="unsupported_parameter")


def _from_field(key: str, value: Any, param: str, whitespace: bool) -> tuple[gen_pb.Constraint, str]:
    """``key``: json, regex, choice, grammar or json_object; ``param``: the request field that set it."""
    msg = gen_pb.Constraint(disable_any_whitespace=whitespace)
    if key == "json":
        msg.json_schema = _schema_text(value, param)
    elif key == "json_object":
        if value is not True:
            raise _bad(param, "must be true when set")
        msg.json_object = True
    elif key == "choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise _bad(param, "must be a list of strings")
        msg.choice.choices.extend(value)
    else:
        if not isinstance(value, str):
            raise _bad(param, "must be a string")
        setattr(msg, "regex" if key == "regex" else "grammar", value)
    return msg, param


def constraint(req: OpenAIRequest, response_format: dict[str, Any] | None) -> tuple[gen_pb.Constraint, str] | None:
    """The request's constraint and the OpenAI field it came from, or None; OpenAIError when
    fields conflict or are malformed."""
    found: list[tuple[gen_pb.Constraint, str]] = []
    if response_format is not None:
        if (c := _from_response_format(response_format)) is not None:
            found.append(c)
    structured = req.structured_outputs or {}
    unknown = sorted(k for k, v in structured.items() if v is not None and k not in (*_STRUCTURED_KEYS, "disable_any_whitespace"))
    if unknown:
        raise OpenAIError(400, f"structured_outputs.{unknown[0]}: is not supported by this server (json, regex, choice, grammar, json_object are)",
                          param=f"structured_outputs.{unknown[0]}", code="unsupported_parameter")
    set_keys = {k: structured[k] for k in _STRUCTURED_KEYS if structured.get(k) not in (None, False)}
    if len(set_keys) > 1:
        raise _bad("structured_outputs", f"set one of {', '.join(_STRUCTURED_KEYS)}, got {', '.join(set_keys)}")
    whitespace = structured.get("disable_any_whitespace", False) is True
    for key, value in set_keys.items():
        found.append(_from_field(key, value, f"structured_outputs.{key}", whitespace))
    for name, key in _GUIDED.items():
        if (value := getattr(req, name)) is not None:
            found.append(_from_field(key, value, name, whitespace))
    if req.guided_whitespace_pattern is not None:
        raise OpenAIError(400, "guided_whitespace_pattern: is not supported (send structured_outputs.disable_any_whitespace)",
                          param="guided_whitespace_pattern", code="unsupported_parameter")
    if len(found) > 1:
        raise _bad(found[1][1], f"conflicts with {found[0][1]}: send one way of constraining the output")
    if found and req.ignore_eos:
        raise _bad("ignore_eos", "cannot be combined with a constrained output: it ends where its grammar does")
    return found[0] if found else None
