"""Grammar-constrained decoding in the engine (splitserve/engine/grammar.py) on a tiny random
llama on the CPU: random weights would write anything, so every valid output is the grammar's doing.

Checks: outputs of each constraint kind match it and end with STOP; a batch mixing constrained
and free requests leaves the free ones' tokens unchanged; async scheduling stays on (no step
falls back to sampling on the host) and gives the synchronous engine's tokens; a matcher rebuilt
from a first token sampled elsewhere (the prefill->decode hop) continues exactly; bad
constraints are refused at validate, naming the field; the bitmask op matches xgrammar's own.
"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
import xgrammar as xgr

from splitserve.engine.constraint import Constraint
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.grammar import apply_bitmask
from splitserve.engine.request import FinishReason, TokenLogprob
from splitserve.engine.sampling_params import SamplingParams
from splitserve.tokenizer import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
}
EBNF = 'root ::= "(" item ("," item){0,3} ")"\nitem ::= [0-9] | "x" | "yes"'
PROMPTS = [[3, 141, 59, 265, 358], [500, 17, 33], list(range(40, 71)), [9]]


@pytest.fixture(scope="module")
def tokenizer(llama_tiny_dir):
    return load_tokenizer(llama_tiny_dir)


def _run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple[list[int], FinishReason]]:
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    tokens: dict[str, list[int]] = {r: [] for r in requests}
    done: dict[str, FinishReason] = {}
    for _ in range(5000):
        if not engine.has_unfinished:
            break
        for out in engine.step().outputs:
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                done[out.request_id] = out.finish_reason
    return {r: (tokens[r], done[r]) for r in requests}


def _text(tokenizer, token_ids: list[int]) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=True)


def _closing_bias(tokenizer) -> dict[int, float]:
    """Random weights write strings and numbers without end; favouring the tokens that close
    them lets free JSON end in a few tokens, while the grammar still decides what is valid."""
    vocab = tokenizer.get_vocab()
    return {i: 10.0 for t, i in vocab.items() if t in ('"', '":', '"}', '}')}


def _constrained(temperature: float, tokenizer=None) -> dict[str, tuple[list[int], SamplingParams]]:
    """Four prompts for each constraint kind; any JSON object only with ``tokenizer`` (its
    requests carry a logit bias, which samples on the host)."""
    kinds = {
        "schema": Constraint.json_schema(SCHEMA, any_whitespace=False),
        "object": Constraint.json_object(any_whitespace=False),
        "regex": Constraint.regex(r"[A-Z][a-z]{1,5}-[0-9]{2,3}"),
        "choice": Constraint.choice(["left", "right", "up or down"]),
        "ebnf": Constraint.grammar(EBNF),
    }
    if tokenizer is None:
        del kinds["object"]
    return {
        f"{name}-{i}": (prompt, SamplingParams(max_tokens=200, temperature=temperature, constraint=constraint,
                                               logit_bias=_closing_bias(tokenizer) if name == "object" else ()))
        for name, constraint in kinds.items()
        for i, prompt in enumerate(PROMPTS)
    }


def _check(tokenizer, results) -> None:
    for request_id, (tokens, finish) in results.items():
        text = _text(tokenizer, tokens)
        assert finish == FinishReason.STOP, (request_id, text)
        kind = request_id.split("-")[0]
        if kind == "schema":
            jsonschema.validate(json.loads(text), SCHEMA)
        elif kind == "object":
            assert isinstance(json.loads(text), dict), text
        elif kind == "regex":
            assert re.fullmatch(r"[A-Z][a-z]{1,5}-[0-9]{2,3}", text), text
        elif kind == "choice":
            assert text in ("left", "right", "up or down"), text
        else:
            assert re.fullmatch(r"\((?:[0-9]|x|yes)(?:,(?:[0-9]|x|yes)){0,3}\)", text), text


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_kind_of_constraint_holds_and_ends_with_stop(make_engine, llama_tiny_dir, tokenizer, temperature):
    results = _run(make_engine(llama_tiny_dir, num_blocks=512), _constrained(temperature, tokenizer))
    assert sum(k.startswith("object") for k in results) == len(PROMPTS)
    _check(tokenizer, results)


def test_async_scheduling_stays_on_and_matches_the_synchronous_engine(make_engine, llama_tiny_dir, tokenizer):
    requests = _constrained(0.0)
    requests["free"] = (PROMPTS[0], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    sync = _run(make_engine(llama_tiny_dir, num_blocks=512, async_scheduling=False), requests)
    engine = make_engine(llama_tiny_dir, num_blocks=512, async_scheduling=True)
    overlapped = _run(engine, requests)
    assert overlapped == sync
    assert engine.num_host_sampled_steps == 0  # every constrained step sampled on the device, overlapped
    _check(tokenizer, {k: v for k, v in overlapped.items() if k != "free"})


def test_free_requests_in_a_constrained_batch_are_unchanged(make_engine, llama_tiny_dir):
    free = {f"free-{i}": (p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)) for i, p in enumerate(PROMPTS)}
    alone = _run(make_engine(llama_tiny_dir, num_blocks=512), free)
    mixed = _run(make_engine(llama_tiny_dir, num_blocks=512), {**free, **_constrained(0.0)})
    assert {k: mixed[k] for k in free} == alone


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_first_token_sampled_elsewhere_continues_the_same_grammar(make_engine, llama_tiny_dir, tokenizer, async_scheduling):
    """The hop at the engine's surface: one engine samples the first token (as a prefill worker
    does), another enqueues the request with it and decodes the rest (as a decode worker does)."""
    for name, (prompt, params) in _constrained(0.0).items():
        whole = _run(make_engine(llama_tiny_dir, num_blocks=512, async_scheduling=async_scheduling), {name: (prompt, params)})[name]
        prefill = make_engine(llama_tiny_dir, num_blocks=512)
        first = _run(prefill, {name: (prompt, SamplingParams(max_tokens=1, temperature=0.0, constraint=params.constraint))})[name][0]
        decode = make_engine(llama_tiny_dir, num_blocks=512, async_scheduling=async_scheduling)
        if whole[1] == FinishReason.STOP and len(whole[0]) == 1:
            assert first == whole[0]
            continue
        decode.enqueue(name, prompt, params, first_token=TokenLogprob(first[0], 0.0))
        rest = _run_enqueued(decode, name)
        assert first + rest[0] == whole[0], name
        assert rest[1] == FinishReason.STOP


def _run_enqueued(engine, request_id: str) -> tuple[list[int], FinishReason]:
    tokens: list[int] = []
    for _ in range(5000):
        for out in engine.step().outputs:
            tokens += out.new_token_ids
            if out.finished:
                return tokens, out.finish_reason
    raise AssertionError("did not finish")


def test_a_first_token_outside_the_grammar_is_refused(make_engine, llama_tiny_dir, tokenizer):
    engine = make_engine(llama_tiny_dir, num_blocks=512)
    params = SamplingParams(max_tokens=8, temperature=0.0, constraint=Constraint.regex("[0-9]+"))
    with pytest.raises(InvalidRequestError, match="constraint.regex"):
        engine.enqueue("r", [3, 4, 5], params, first_token=TokenLogprob(tokenizer.encode("x", add_special_tokens=False)[0], 0.0))
    assert not engine.has_unfinished


@pytest.mark.parametrize(
    "constraint, field",
    [
        (lambda: Constraint.regex("[a-"), "constraint.regex"),
        (lambda: Constraint.regex("(ab"), "constraint.regex"),
        (lambda: Constraint.json_schema({"type": "frobnicate"}), "constraint.json_schema"),
        (lambda: Constraint.json_schema({"properties": {"a": {"$ref": "#/nowhere"}}}), "constraint.json_schema"),
        (lambda: Constraint.grammar("root ::= missing_rule"), "constraint.grammar"),
    ],
)
def test_constraints_that_do_not_compile_are_refused_at_validate(make_engine, llama_tiny_dir, constraint, field):
    engine = make_engine(llama_tiny_dir)
    with pytest.raises(InvalidRequestError) as info:
        engine.validate([3, 4], SamplingParams(constraint=constraint()))
    assert info.value.field == field
    assert "does not compile" in str(info.value)
    assert not engine.has_unfinished


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: Constraint.json_schema("{not json"), "constraint.json_schema"),
        (lambda: Constraint.json_schema("[1, 2]"), "constraint.json_schema"),
        (lambda: Constraint.regex(""), "constraint.regex"),
        (lambda: Constraint.choice([]), "constraint.choice"),
        (lambda: Constraint.choice(["a", ""]), "constraint.choice"),
        (lambda: Constraint.grammar("x" * 70_000), "constraint.grammar"),
        (lambda: SamplingParams(ignore_eos=True, constraint=Constraint.regex("a")), "ignore_eos"),
    ],
)
def test_malformed_constraints_are_refused_when_built(build, field):
    with pytest.raises(InvalidRequestError) as info:
        build()
    assert info.value.field == field


def test_apply_bitmask_matches_xgrammar():
    torch.manual_seed(0)
    vocab = 1000
    logits = torch.randn(5, vocab)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, (vocab + 31) // 32), dtype=torch.int32)
    bitmask[2] = -1  # a free row
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask)
    got = apply_bitmask(logits, bitmask)
    assert torch.equal(got, expected)
    assert torch.equal(got[2], logits[2])


def test_preempted_constrained_requests_keep_their_grammar_state(make_engine, llama_tiny_dir, tokenizer):
    """Preemption recomputes a request's KV from its tokens; its matcher (kept with the request)
    is not replayed, and the outputs equal those of an engine with room for all."""
    constraint = Constraint.json_schema(SCHEMA, any_whitespace=False)
    requests = {f"schema-{i}": (list(range(40 + i, 71 + i)), SamplingParams(max_tokens=100, temperature=0.0, constraint=constraint))
                for i in range(12)}
    roomy = _run(make_engine(llama_tiny_dir, num_blocks=512), requests)
    tight = make_engine(llama_tiny_dir, num_blocks=60, async_scheduling=True)
    assert _run(tight, requests) == roomy
    assert tight.scheduler.num_preemptions > 0
    _check(tokenizer, roomy)


def test_a_speculative_engine_refuses_constraints(llama_tiny_dir):
    """Speculative proposals and their acceptance do not consult a grammar: refused, not ignored."""
    from splitserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
    from splitserve.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(
        model=ModelConfig(llama_tiny_dir, dtype=torch.float32), cache=CacheConfig(block_size=4, num_blocks=64),
        scheduler=SchedulerConfig(), speculative=SpeculativeConfig(method="ngram"),
    ))
    with pytest.raises(InvalidRequestError) as info:
        engine.validate([3, 4, 5], SamplingParams(constraint=Constraint.regex("[0-9]+")))
    assert info.value.field == "constraint.regex" and "speculative" in str(info.value)
    engine.validate([3, 4, 5], SamplingParams())  # unconstrained requests are served as before
