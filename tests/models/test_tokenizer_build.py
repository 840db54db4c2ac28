"""The full-vocabulary tokenizer of the real-shape presets: every id is text."""
from __future__ import annotations

import statistics

import pytest

from splitserve.models.checkpoint_init import PRESETS, build_config, tokenizer_vocab_size
from splitserve.models.tokenizer_build import MAX_TRAINED_BPE, TOKENIZER_STYLES, build_tokenizer


@pytest.fixture(scope="module")
def qwen3_full():
    return build_tokenizer(PRESETS["qwen3-0.6b"].fields("qwen3")["vocab_size"], arch="qwen3")


def test_every_id_of_a_real_preset_decodes_to_text(qwen3_full):
    config = build_config("qwen3", "qwen3-0.6b")
    assert len(qwen3_full) == config.vocab_size == 151936
    backend = qwen3_full.backend_tokenizer
    texts = [backend.decode([i], skip_special_tokens=False) for i in range(config.vocab_size)]
    assert [i for i, text in enumerate(texts) if not text] == []
    # Tokens of realistic length (real 150k vocabularies average ~6-7 characters), not bytes.
    constructed = texts[MAX_TRAINED_BPE : -len(TOKENIZER_STYLES["qwen3"].special_tokens)]
    assert 5 <= statistics.mean(len(t) for t in constructed) <= 9
    # The config's special ids are the tokenizer's.
    assert qwen3_full.convert_tokens_to_ids("<|endoftext|>") == config.eos_token_id
    assert texts[config.eos_token_id] == "<|endoftext|>"


def test_constructed_words_encode_to_their_own_token(qwen3_full):
    backend = qwen3_full.backend_tokenizer
    for token_id in (MAX_TRAINED_BPE + 10, 50_000, 100_000, 151_000):
        text = backend.decode([token_id])
        assert backend.encode(text, add_special_tokens=False).ids == [token_id], text
    text = "The prefill worker streams Waim pleam tokens, 12345 héllo 🙂"
    assert qwen3_full.decode(qwen3_full.encode(text)) == text


def test_other_architectures_and_sizes():
    for arch, preset in (("llama", "llama-3.2-1b"), ("mistral", "mistral-7b")):
        config = build_config(arch, preset)
        tokenizer = build_tokenizer(config.vocab_size, arch=arch)
        assert len(tokenizer) == config.vocab_size
        assert tokenizer.convert_tokens_to_ids(TOKENIZER_STYLES[arch].eos_token) == config.eos_token_id
    # The tiny presets keep their small trained tokenizer (their tests' token ids depend on it).
    assert tokenizer_vocab_size("tiny", 1088) == 1024
    assert tokenizer_vocab_size("qwen3-0.6b", 151936) == 151936
    # Deterministic, and the trained part is the one a small tokenizer has.
    a, b = build_tokenizer(6000, arch="qwen3"), build_tokenizer(6000, arch="qwen3")
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    small = build_tokenizer(MAX_TRAINED_BPE + 3, arch="qwen3").backend_tokenizer.get_vocab()
    assert all(a.backend_tokenizer.token_to_id(t) == i for t, i in small.items() if i < MAX_TRAINED_BPE)
