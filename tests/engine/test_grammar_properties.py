"""Property-based: JSON schemas and regexes drawn by hypothesis, each the constraint of a request
to a tiny random-weight llama on the CPU. Random weights would write anything, so each output
that parses and validates does so because of its grammar.

Five batches of 40 schemas and five of 40 regexes (200 of each, drawn deterministically):
every output must end with STOP (the grammar finished), parse, and validate against its schema
(``jsonschema``) or fully match its regex (Python's ``re``). Half the requests are greedy,
half sampled. Every generated thing is bounded (string lengths, array sizes, integer ranges,
repeat counts; JSON's optional whitespace is bounded by the compiler), so that a random model
reaches the end within max_tokens. A third of the schemas allow that whitespace.
"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve.engine.constraint import Constraint
from splitserve.engine.request import FinishReason
from splitserve.engine.sampling_params import SamplingParams
from splitserve.tokenizer import load_tokenizer

BATCH = 40
MAX_TOKENS = 1500  # JSON with whitespace: up to 24 characters at each of dozens of places
NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ABC0123456789-", min_size=1, max_size=8)


@st.composite
def integer_schema(draw):
    low = draw(st.integers(-1000, 1000))
    return {"type": "integer", "minimum": low, "maximum": low + draw(st.integers(0, 5000))}


@st.composite
def string_schema(draw):
    high = draw(st.integers(0, 12))
    schema = {"type": "string", "maxLength": high}
    if draw(st.booleans()):
        schema["minLength"] = draw(st.integers(0, high))
    return schema


LEAVES = st.one_of(
    integer_schema(),
    string_schema(),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(WORDS, min_size=1, max_size=5, unique=True).map(lambda e: {"enum": e}),
    st.lists(st.integers(-50, 50), min_size=1, max_size=4, unique=True).map(lambda e: {"enum": e}),
    WORDS.map(lambda c: {"const": c}),
    st.just({"type": "string", "pattern": "^[a-z]{1,3}-[0-9]{1,3}$"}),
)


@st.composite
def array_of(draw, items):
    high = draw(st.integers(0, 4))
    return {"type": "array", "items": draw(items), "minItems": draw(st.integers(0, high)), "maxItems": high}


@st.composite
def object_of(draw, values):
    properties = draw(st.dictionaries(NAMES, values, min_size=1, max_size=4))
    required = [k for k in properties if draw(st.booleans())]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


SCHEMAS = st.recursive(LEAVES, lambda inner: st.one_of(array_of(inner), object_of(inner)), max_leaves=8).map(
    lambda s: s if s.get("type") == "object" else {"type": "object", "properties": {"value": s}, "required": ["value"]}
)

_ATOMS = st.one_of(
    st.sampled_from(["[a-z]", "[0-9]", "[A-Z]", "[a-f0-9]", "[xyz]", r"\d", "[^\\s\"\\\\]"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEF0123456789_-:@", min_size=1, max_size=3).map(re.escape),
    st.lists(st.text(alphabet="abcdefgh0123", min_size=1, max_size=4), min_size=2, max_size=3).map(lambda alts: "(" + "|".join(alts) + ")"),
)


@st.composite
def regex_piece(draw):
    atom = draw(_ATOMS)
    kind = draw(st.sampled_from(["", "?", "range"]))
    if kind == "range":
        low = draw(st.integers(0, 3))
        return f"{atom}{{{low},{low + draw(st.integers(0, 3))}}}" if atom[-1] not in "}?" else atom
    return atom + kind


REGEXES = st.lists(regex_piece(), min_size=1, max_size=5).map("".join).filter(lambda r: re.compile(r) is not None)


@pytest.fixture(scope="module")
def engine(make_engine, llama_tiny_dir):
    return make_engine(llama_tiny_dir, num_blocks=BATCH * (MAX_TOKENS // 4 + 8), max_num_seqs=BATCH)


@pytest.fixture(scope="module")
def tokenizer(llama_tiny_dir):
    return load_tokenizer(llama_tiny_dir)


def _generate(engine, constraints: list[Constraint], tag: str) -> list[tuple[list[int], FinishReason]]:
    ids = [f"{tag}-{i}" for i in range(len(constraints))]
    for i, (request_id, constraint) in enumerate(zip(ids, constraints)):
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0 if i % 2 else 1.0, constraint=constraint)
        engine.add_request(request_id, [3 + i, 141, 59, 265 + i], params)
    tokens: dict[str, list[int]] = {r: [] for r in ids}
    done: dict[str, FinishReason] = {}
    while engine.has_unfinished:
        for out in engine.step().outputs:
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                done[out.request_id] = out.finish_reason
    return [(tokens[r], done[r]) for r in ids]


_batches = iter(range(10_000))
PROPERTY_SETTINGS = settings(max_examples=5, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY_SETTINGS
@given(schemas=st.lists(SCHEMAS, min_size=BATCH, max_size=BATCH))
def test_outputs_of_generated_schemas_parse_and_validate(engine, tokenizer, schemas):
    constraints = [Constraint.json_schema(s, any_whitespace=i % 3 == 0) for i, s in enumerate(schemas)]
    results = _generate(engine, constraints, f"schema-{next(_batches)}")
    for schema, (tokens, finish) in zip(schemas, results):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        assert finish == FinishReason.STOP, (schema, text)
        jsonschema.validate(json.loads(text), schema)


@PROPERTY_SETTINGS
@given(regexes=st.lists(REGEXES, min_size=BATCH, max_size=BATCH))
def test_outputs_of_generated_regexes_match_them(engine, tokenizer, regexes):
    results = _generate(engine, [Constraint.regex(r) for r in regexes], f"regex-{next(_batches)}")
    for regex, (tokens, finish) in zip(regexes, results):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        assert finish == FinishReason.STOP, (regex, text)
        assert re.fullmatch(regex, text), (regex, text)
