"""Constrained output through real processes: a `splitserve up` stack (router, prefill worker,
decode worker: every prompt is prefilled on the prefill worker, whose engine samples the first
token under the grammar; the decode worker rebuilds the matcher from it) against a colocated
cluster (one decode worker that prefills itself). Random weights: only the grammar makes the
outputs valid.

Checks: the same tokens disaggregated and colocated for every kind of constraint, greedy and
seeded sampling, over gRPC; OpenAI's response_format and vLLM's structured_outputs / guided_*
through the `openai` client; invalid schemas, regexes and grammars refused (400 naming the
field, INVALID_ARGUMENT) before any worker sees them.
"""
from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import jsonschema
import openai
import pytest

from splitserve.client import Client, build_request
from splitserve.testing.cluster import Cluster, UpProcess
from splitserve.v1 import generation_pb2 as gen_pb
from splitserve.v1 import generation_pb2_grpc, worker_pb2_grpc
from splitserve.v1 import worker_pb2 as worker_pb

pytestmark = [pytest.mark.slow]

LISTENING = re.compile(r"splitserve router listening on (\S+) .*OpenAI-compatible HTTP API at (\S+?)[;)]")
WORKER_READY = re.compile(r"\[(prefill|decode)\] ready at (\S+)")
WORKER_KEY = "wk-structured-test-91c2"
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000},
        "coastal": {"type": "boolean"},
        "kind": {"enum": ["town", "city", "village"]},
    },
    "required": ["city", "population", "coastal", "kind"],
}
REGEX = r"[0-9]{3}-[A-Z]{2}[a-z]{0,3}"
GRAMMAR = 'root ::= "[" num ("," num){0,4} "]"\nnum ::= [1-9] [0-9]{0,2}'
CHOICES = ["red", "green", "dark blue"]
CONSTRAINTS = {
    "json_schema": gen_pb.Constraint(json_schema=json.dumps(SCHEMA), disable_any_whitespace=True),
    "regex": gen_pb.Constraint(regex=REGEX),
    "grammar": gen_pb.Constraint(grammar=GRAMMAR),
    "choice": gen_pb.Constraint(choice=gen_pb.Choices(choices=CHOICES)),
}
PROMPTS = [list(range(3, 40)), [500, 17, 33, 9, 81, 200, 301, 44, 12, 99, 7, 8]]


def _valid(kind: str, text: str) -> bool:
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if kind == "grammar":
        return re.fullmatch(r"\[[1-9][0-9]{0,2}(,[1-9][0-9]{0,2}){0,4}\]", text) is not None
    return text in CHOICES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def up(e2e_model_dir: Path, tmp_path_factory) -> Iterator[tuple[str, str, dict[str, str]]]:
    """`splitserve up`: (gRPC address, OpenAI base URL, {role: worker address})."""
    keys = tmp_path_factory.mktemp("structured-keys") / "keys"
    keys.write_text(WORKER_KEY + "\n")
    process = UpProcess(["--model", str(e2e_model_dir), "--port", str(_free_port()), "--http-port", str(_free_port()),
                         "--worker-keys-file", str(keys)])
    try:
        match = process.wait_for(LISTENING)
        workers = {m.group(1): m.group(2) for m in map(WORKER_READY.search, process.lines) if m}
        yield match.group(1), match.group(2), workers
    finally:
        process.stop(60)


@pytest.fixture(scope="module")
def colocated(e2e_model_dir: Path) -> Iterator[Cluster]:
    cluster = Cluster(e2e_model_dir)
    try:
        cluster.add_workers(("decode", "decode-colocated"))
        yield cluster
    finally:
        cluster.stop()


def _prefill_stats(workers: dict[str, str]) -> worker_pb.WorkerStats:
    with grpc.insecure_channel(workers["prefill"]) as channel:
        return worker_pb2_grpc.PrefillWorkerStub(channel).GetStats(
            worker_pb.StatsRequest(), timeout=10, metadata=(("authorization", f"Bearer {WORKER_KEY}"),))


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 1234)])
def test_constrained_tokens_are_the_same_disaggregated_and_colocated(up, colocated, temperature, seed):
    grpc_address, _, workers = up
    disaggregated, local = Client(grpc_address), Client(colocated.address)
    sampling = {"seed": seed} if seed is not None else {}
    before = _prefill_stats(workers).num_prompt_tokens_computed
    for kind, constraint in CONSTRAINTS.items():
        for prompt in PROMPTS:
            a = disaggregated.complete(prompt, max_tokens=120, temperature=temperature, constraint=constraint, timeout=120, **sampling)
            b = local.complete(prompt, max_tokens=120, temperature=temperature, constraint=constraint, timeout=120, **sampling)
            assert a.token_ids == b.token_ids, (kind, a.text, b.text)
            assert a.finish_reason == b.finish_reason == "stop", (kind, a.text)
            assert _valid(kind, a.text), (kind, a.text)
    # Every prompt went through the prefill worker (its prefix cache may have served a part).
    assert _prefill_stats(workers).num_prompt_tokens_computed > before


@pytest.mark.parametrize(
    "constraint, field",
    [
        (gen_pb.Constraint(regex="[0-9"), "constraint.regex"),
        (gen_pb.Constraint(json_schema='{"type": "frobnicate"}'), "constraint.json_schema"),
        (gen_pb.Constraint(json_schema="{nope"), "constraint.json_schema"),
        (gen_pb.Constraint(grammar="root ::= undefined_rule"), "constraint.grammar"),
        (gen_pb.Constraint(choice=gen_pb.Choices()), "constraint.choice"),
        (gen_pb.Constraint(), "sampling.constraint"),
    ],
)
def test_an_invalid_constraint_is_invalid_argument_naming_it(up, constraint, field):
    grpc_address, _, workers = up
    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(grpc_address))
    before = _prefill_stats(workers).num_prompt_tokens_computed
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(build_request([3, 4, 5], max_tokens=8, constraint=constraint), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()
    assert _prefill_stats(workers).num_prompt_tokens_computed == before  # no worker computed anything


@pytest.fixture(scope="module")
def client(up) -> openai.OpenAI:
    return openai.OpenAI(base_url=up[1], api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(e2e_model_dir) -> str:
    return e2e_model_dir.name


MESSAGES = [{"role": "user", "content": "Describe a city."}]


def test_response_format_json_schema_through_the_openai_client(up, client, model):
    out = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=1200, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}},
    )
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    streamed = list(client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=1200, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
    ))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == out.choices[0].message.content


def test_response_format_json_object_and_vllm_fields(client, model, closing_bias):
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1200, temperature=0,
                                         response_format={"type": "json_object"}, logit_bias=closing_bias)
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    for extra, check in [
        ({"structured_outputs": {"regex": REGEX}}, lambda t: re.fullmatch(REGEX, t)),
        ({"structured_outputs": {"choice": CHOICES}}, lambda t: t in CHOICES),
        ({"structured_outputs": {"grammar": GRAMMAR}}, lambda t: _valid("grammar", t)),
        ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}, lambda t: _valid("json_schema", t)),
        ({"guided_json": json.dumps(SCHEMA)}, lambda t: _valid("json_schema", t)),
        ({"guided_regex": REGEX}, lambda t: re.fullmatch(REGEX, t)),
        ({"guided_choice": CHOICES}, lambda t: t in CHOICES),
    ]:
        chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1200, temperature=0, extra_body=extra)
        assert check(chat.choices[0].message.content), (extra, chat.choices[0].message.content)
        text = client.completions.create(model=model, prompt="Once upon", max_tokens=1200, temperature=0.8, seed=7, extra_body=extra)
        assert check(text.choices[0].text), (extra, text.choices[0].text)


@pytest.fixture(scope="module")
def closing_bias(e2e_model_dir) -> dict[str, int]:
    """Favours the tokens that close strings and objects: random weights otherwise write free
    JSON without end. The grammar still decides what is valid."""
    from splitserve.tokenizer import load_tokenizer

    vocab = load_tokenizer(e2e_model_dir).get_vocab()
    return {str(i): 10 for t, i in vocab.items() if t in ('"', '":', '"}', '}')}


@pytest.mark.parametrize(
    "body, param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
         "response_format.json_schema.schema"),
        ({"structured_outputs": {"regex": "([a-z"}}, "structured_outputs.regex"),
        ({"guided_grammar": "root ::= nothing_here"}, "guided_grammar"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs.regex"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ],
)
def test_invalid_structured_output_is_a_400_naming_the_field(up, model, body, param):
    import httpx

    r = httpx.post(f"{up[1]}/chat/completions", json={"model": model, "messages": MESSAGES, "max_tokens": 8, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["message"].startswith(param), error


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}, "required": ["zone"]}}}


def _calls(message_calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message_calls]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_calls_whole_and_streamed_agree(client, model, tool_choice):
    kwargs = {"model": model, "messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [WEATHER, TIME],
              "tool_choice": tool_choice, "max_tokens": 1200, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = _calls(choice.message.tool_calls)
    assert calls and all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
    for name, arguments in calls:
        schema = {"get_weather": WEATHER, "get_time": TIME}[name]["function"]["parameters"]
        jsonschema.validate(arguments, schema)
    if isinstance(tool_choice, dict):
        assert [name for name, _ in calls] == ["get_time"]
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assembled: dict[int, dict] = {}
    for d in deltas:
        entry = assembled.setdefault(d.index, {"name": "", "arguments": ""})
        entry["name"] += d.function.name or ""
        entry["arguments"] += d.function.arguments or ""
    assert [(e["name"], json.loads(e["arguments"])) for _, e in sorted(assembled.items())] == calls
    if isinstance(tool_choice, dict):  # a named function's arguments stream as they are made, not in one piece
        assert len(deltas) > 1 and deltas[0].id and all(d.id is None for d in deltas[1:])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tool_choice_auto_parses_the_family_format_whole_and_streamed(client, model):
    """auto: the model decides. Random weights would not call a tool, so the request also
    constrains the text to a call in Llama 3's JSON format (the tiny checkpoint is a llama);
    the router's llama3_json parser reads it out, whole and streamed alike."""
    call = {"type": "object", "properties": {"name": {"const": "get_time"}, "parameters": TIME["function"]["parameters"]},
            "required": ["name", "parameters"]}
    kwargs = {"model": model, "messages": [{"role": "user", "content": "Time?"}], "tools": [WEATHER, TIME], "max_tokens": 1200,
              "temperature": 0, "extra_body": {"structured_outputs": {"json": call}}}
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].finish_reason == "tool_calls"
    calls = _calls(whole.choices[0].message.tool_calls)
    assert [name for name, _ in calls] == ["get_time"]
    jsonschema.validate(calls[0][1], TIME["function"]["parameters"])
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == calls
    # Free text under auto stays text.
    free = client.chat.completions.create(model=model, messages=MESSAGES, tools=[WEATHER], max_tokens=12, temperature=0,
                                          extra_body={"structured_outputs": {"regex": "[a-z ]{5,20}"}})
    assert free.choices[0].message.tool_calls is None and free.choices[0].finish_reason == "stop"
    assert re.fullmatch("[a-z ]{5,20}", free.choices[0].message.content)


def test_tool_choice_errors_are_400_naming_the_field(up, model):
    import httpx

    body = {"model": model, "messages": MESSAGES, "max_tokens": 8, "tools": [WEATHER]}
    r = httpx.post(f"{up[1]}/chat/completions", json={**body, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice.function.name"
    r = httpx.post(f"{up[1]}/chat/completions", json={**body, "tools": [{"type": "function", "function": {"parameters": {}}}]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools.0"
    r = httpx.post(f"{up[1]}/chat/completions", json={**body, "tool_choice": "required", "response_format": {"type": "json_object"}}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    r = httpx.post(f"{up[1]}/chat/completions", json={**body, "tool_choice": "none"}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_langchain_structured_output_and_bind_tools(up, model):
    """LangChain's ChatOpenAI against `splitserve up`: with_structured_output (JSON schema, and
    function calling), bind_tools with a required and a named tool, and tools left to auto."""
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model=model, base_url=up[1], api_key="unused", temperature=0, max_tokens=1200, max_retries=0, timeout=120)
    schema = {"title": "City", "description": "A city", **SCHEMA}
    city = llm.with_structured_output(schema, method="json_schema").invoke("Describe a city.")
    jsonschema.validate(city, SCHEMA)
    city = llm.with_structured_output(schema, method="function_calling").invoke("Describe a city.")
    jsonschema.validate(city, SCHEMA)
    message = llm.bind_tools([WEATHER, TIME], tool_choice="any").invoke("Weather in Oslo?")
    assert message.tool_calls and {c["name"] for c in message.tool_calls} <= {"get_weather", "get_time"}
    for call in message.tool_calls:
        jsonschema.validate(call["args"], {"get_weather": WEATHER, "get_time": TIME}[call["name"]]["function"]["parameters"])
    message = llm.bind_tools([WEATHER, TIME], tool_choice="get_weather").invoke("Weather in Oslo?")
    assert [c["name"] for c in message.tool_calls] == ["get_weather"]
    jsonschema.validate(message.tool_calls[0]["args"], WEATHER["function"]["parameters"])
    free = llm.bind_tools([WEATHER]).bind(max_tokens=8).invoke("Hello")
    assert isinstance(free.content, str)


def test_a_worker_called_directly_refuses_an_invalid_constraint(up):
    """The workers compile too (off their event loop): a caller holding the worker key that
    skips the router still gets INVALID_ARGUMENT, and the worker keeps serving."""
    grpc_address, _, workers = up
    sampling = gen_pb.SamplingParams(temperature=0.0, constraint=gen_pb.Constraint(regex="(unclosed"))
    request = worker_pb.EngineRequest(request_id="direct-1", prompt_token_ids=[3, 4, 5], sampling=sampling, max_tokens=4)
    with grpc.insecure_channel(workers["prefill"]) as channel:
        with pytest.raises(grpc.RpcError) as info:
            worker_pb2_grpc.PrefillWorkerStub(channel).Prefill(worker_pb.PrefillRequest(request=request), timeout=60,
                                                               metadata=(("authorization", f"Bearer {WORKER_KEY}"),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("constraint.regex"), info.value.details()
    out = Client(grpc_address).complete([3, 4, 5], max_tokens=30, constraint=CONSTRAINTS["regex"], timeout=60)
    assert re.fullmatch(REGEX, out.text)
