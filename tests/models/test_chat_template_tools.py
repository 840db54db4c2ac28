"""The written checkpoints' chat templates render tools, assistant tool calls and tool results in
each family's manner (splitserve/models/tokenizer_build.py), and render as before without tools.
The tool calls they render are what the router's parsers read (services/router/openai/tool_parsers.py)."""
from __future__ import annotations

import json

import pytest
from splitserve.services.router.openai.tool_parsers import parser_for

from splitserve.models.tokenizer_build import build_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Weather in Oslo?"}]
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}
TURN_ENDS = {"llama": "<|eot_id|>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>", "mistral": "</s>"}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch_tokenizer(request):
    return request.param, build_tokenizer(1024, arch=request.param)


def test_tools_are_rendered_and_plain_chats_are_unchanged(arch_tokenizer):
    _arch, tokenizer = arch_tokenizer
    plain = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(MESSAGES, tools=None, tokenize=False, add_generation_prompt=True) == plain
    with_tools = tokenizer.apply_chat_template(MESSAGES, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert json.dumps(WEATHER) in with_tools and "get_weather" not in plain
    assert "Be terse." in with_tools and "Weather in Oslo?" in with_tools


def test_a_rendered_tool_call_is_what_the_familys_parser_reads(arch_tokenizer):
    arch, tokenizer = arch_tokenizer
    messages = [*MESSAGES, {"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'}]
    text = tokenizer.apply_chat_template(messages, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert '{"temp": 3}' in text
    before = tokenizer.apply_chat_template(MESSAGES, tools=[WEATHER], tokenize=False, add_generation_prompt=arch == "mistral")
    turn = text[len(before):].split(TURN_ENDS[arch])[0]  # the assistant's turn as the model would write it
    for header in ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|im_start|>assistant\n"):
        turn = turn.removeprefix(header)
    _content, calls = parser_for(ARCHITECTURES[arch]).parse(turn)
    assert calls == [{"name": "get_weather", "arguments": {"city": "Oslo"}}], turn
