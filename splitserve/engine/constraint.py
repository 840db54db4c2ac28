"""What a request's output must match: a JSON schema, any JSON object, a regex, one of a few
strings, or an EBNF grammar. Checked for shape here; ``grammar.GrammarCompiler`` compiles it
(and refuses what does not compile) against a tokenizer."""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from splitserve.engine.errors import InvalidRequestError

MAX_SPEC_CHARS = 64 * 1024  # a schema, regex or grammar; compiling costs with its size
MAX_CHOICES = 256


class ConstraintKind(enum.Enum):
    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    CHOICE = "choice"
    GRAMMAR = "grammar"  # EBNF, as xgrammar (and llama.cpp's GBNF) read it


@dataclass(frozen=True)
class Constraint:
    """``spec``: the schema as JSON text, the regex or the grammar ("" for JSON_OBJECT);
    ``choices`` for CHOICE. ``any_whitespace`` False: JSON without optional whitespace."""

    kind: ConstraintKind
    spec: str = ""
    choices: tuple[str, ...] = ()
    any_whitespace: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        field = self.field
        if len(self.spec) > MAX_SPEC_CHARS:
            raise InvalidRequestError(field, f"has {len(self.spec)} characters; the limit is {MAX_SPEC_CHARS}")
        if self.kind == ConstraintKind.CHOICE:
            if not self.choices or len(self.choices) > MAX_CHOICES:
                raise InvalidRequestError(field, f"needs 1 to {MAX_CHOICES} strings, got {len(self.choices)}")
            if any(not c for c in self.choices):
                raise InvalidRequestError(field, "a choice is empty")
            if sum(map(len, self.choices)) > MAX_SPEC_CHARS:
                raise InvalidRequestError(field, f"the choices have more than {MAX_SPEC_CHARS} characters in all")
        elif self.kind in (ConstraintKind.REGEX, ConstraintKind.GRAMMAR, ConstraintKind.JSON_SCHEMA) and not self.spec.strip():
            raise InvalidRequestError(field, "is empty")
        if self.kind == ConstraintKind.JSON_SCHEMA:
            try:
                schema = json.loads(self.spec)
            except ValueError as e:
                raise InvalidRequestError(field, f"is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError(field, f"must be a JSON object, got {type(schema).__name__}")

    @property
    def field(self) -> str:
        """The request field an error names."""
        return f"constraint.{self.kind.value}"

    @classmethod
    def json_schema(cls, schema: dict | str, any_whitespace: bool = True) -> Constraint:
        return cls(ConstraintKind.JSON_SCHEMA, schema if isinstance(schema, str) else json.dumps(schema), any_whitespace=any_whitespace)

    @classmethod
    def json_object(cls, any_whitespace: bool = True) -> Constraint:
        return cls(ConstraintKind.JSON_OBJECT, any_whitespace=any_whitespace)

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls(ConstraintKind.REGEX, pattern)

    @classmethod
    def choice(cls, choices: list[str] | tuple[str, ...]) -> Constraint:
        return cls(ConstraintKind.CHOICE, choices=tuple(choices))

    @classmethod
    def grammar(cls, ebnf: str) -> Constraint:
        return cls(ConstraintKind.GRAMMAR, ebnf)
