"""Incremental detokenization: deltas add up to the full text, multi-byte characters never split."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from splitserve.services.router.detokenizer import REPLACEMENT, IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))


TEXTS = ["héllo wörld 日本語 🙂 and more", "🙂🙂🙂", " leading space, then 数字 123", "plain ascii words"]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_and_never_carry_a_split_character(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=[], skip_special_tokens=True, prompt_tail=[])
    deltas = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any(REPLACEMENT in d for d in deltas)
    if any(ord(c) > 0xFFFF for c in text):
        assert any(d == "" for d in deltas[:-1]), "an emoji spans several byte tokens: some steps emit nothing"


def test_stop_string_is_cut_and_partial_matches_are_held_back(tokenizer):
    text = "alpha beta STOP gamma"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["STOP"], skip_special_tokens=True, prompt_tail=[])
    out = ""
    for i in ids:
        out += detok.add([i])
        assert "ST" not in out or "STOP" in text[: len(out)]  # never shows a prefix of the stop string early
        if detok.matched_stop:
            break
    out += detok.flush()
    assert detok.matched_stop == "STOP"
    assert out == "alpha beta "


def test_text_that_only_looked_like_a_stop_prefix_is_released_at_the_end(tokenizer):
    ids = tokenizer.encode("ends with ST", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["STOP"], skip_special_tokens=True, prompt_tail=[])
    out = "".join(detok.add([i]) for i in ids)
    assert not out.endswith("ST")
    assert out + detok.flush() == "ends with ST"


def test_prompt_tail_gives_the_first_token_its_leading_space(tokenizer):
    prompt = tokenizer.encode("Hello", add_special_tokens=False)
    ids = tokenizer.encode("Hello world", add_special_tokens=False)[len(prompt) :]
    detok = IncrementalDetokenizer(tokenizer, stop=[], skip_special_tokens=True, prompt_tail=prompt)
    assert "".join(detok.add([i]) for i in ids) + detok.flush() == tokenizer.decode(prompt + ids)[len("Hello") :]


@pytest.mark.parametrize("chunk", [2, 3, 7])
@pytest.mark.parametrize("text", TEXTS)
def test_tokens_arriving_several_at_a_time_give_the_same_text(tokenizer, text, chunk):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=[], skip_special_tokens=True, prompt_tail=[])
    deltas = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert detok.matched_at is None


@pytest.mark.parametrize("chunk", [1, 2, 4, 64])
def test_a_stop_string_inside_a_chunk_says_how_many_of_its_tokens_were_taken(tokenizer, chunk):
    text = "alpha beta STOP gamma delta"
    ids = tokenizer.encode(text, add_special_tokens=False)
    # The token that completes "STOP": the first prefix of the ids whose text contains it.
    completes = next(n for n in range(1, len(ids) + 1) if "STOP" in tokenizer.decode(ids[:n]))
    detok = IncrementalDetokenizer(tokenizer, stop=["STOP"], skip_special_tokens=True, prompt_tail=[])
    out, taken = "", 0
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        out += detok.add(part)
        if detok.matched_stop:
            taken += detok.matched_at
            break
        taken += len(part)
    assert detok.matched_stop == "STOP"
    assert taken == completes
    assert out + detok.flush() == "alpha beta "
