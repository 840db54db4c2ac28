"""The tool-call parsers of the supported families (services/router/openai/tool_parsers.py),
whole and streamed: whatever way the text is cut into deltas, the content sent plus the calls
at the end equal what the whole text parses into."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from splitserve.services.router.openai.tool_parsers import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    StreamSplitter,
    parser_for,
)
from splitserve.services.router.openai.tools import RequiredCalls

WEATHER = {"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}
TIME = {"name": "get_time", "arguments": {"zone": "UTC"}}

CASES = [
    # (parser, text, content, calls)
    (HermesParser(), 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>',
     "Let me check.", [WEATHER]),
    (HermesParser(), ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}</tool_call>\n'
                     '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'), None, [WEATHER, TIME]),
    (HermesParser(), "No tools needed: it is 3 < 4.", "No tools needed: it is 3 < 4.", []),
    (HermesParser(), "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    (Llama3JsonParser(), '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 3}}', None, [WEATHER]),
    (Llama3JsonParser(), ('<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}; {"name": "get_weather", "parameters": '
                         '{"city": "Oslo", "days": 3}}'), None, [TIME, WEATHER]),
    (Llama3JsonParser(), "  The weather is fine.", "  The weather is fine.", []),
    (Llama3JsonParser(), '{"just": "json"}', '{"just": "json"}', []),
    (MistralParser(), '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}]', None, [WEATHER]),
    (MistralParser(), 'Sure. [TOOL_CALLS][{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}]', "Sure.", [TIME]),
    (MistralParser(), "[TOOL_CALLS] nothing", "[TOOL_CALLS] nothing", []),
    (MistralParser(), '[{"name": "get_time", "arguments": {"zone": "UTC"}}]', None, [TIME]),  # the marker dropped as a special token
    (MistralParser(), "[1, 2] are numbers", "[1, 2] are numbers", []),
    (MistralParser(), '[{"a": 1}] is a list', '[{"a": 1}] is a list', []),
    (RequiredCalls(None), '[{"name": "get_time", "parameters": {"zone": "UTC"}}]', None, [TIME]),
    (RequiredCalls("get_weather"), '{"city": "Oslo", "days": 3}', None, [WEATHER]),
]


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_whole_text(parser, text, content, calls):
    assert parser.parse(text) == (content, calls)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(0, 200), max_size=12))
def test_streamed_in_any_pieces_gives_the_whole_result(case, cuts):
    parser, text, content, calls = case
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    splitter = StreamSplitter(parser)
    sent = "".join(splitter.feed(text[a:b]) for a, b in itertools.pairwise(bounds))
    rest, streamed_calls = splitter.finish()
    assert streamed_calls == calls
    if calls:
        assert sent.strip() == (content or "")  # the text before the calls went out as it came
        assert rest == ""
    else:
        assert sent + rest == text  # not a call after all: every character went out, in order


def test_text_is_not_held_longer_than_a_marker_prefix():
    splitter = StreamSplitter(HermesParser())
    assert splitter.feed("Hello <tool") == "Hello "
    assert splitter.feed("kit") == "<toolkit"


def test_architectures_map_to_their_family_format():
    assert isinstance(parser_for("Qwen3ForCausalLM"), HermesParser)
    assert isinstance(parser_for("Qwen2ForCausalLM"), HermesParser)
    assert isinstance(parser_for("LlamaForCausalLM"), Llama3JsonParser)
    assert isinstance(parser_for("MistralForCausalLM"), MistralParser)
