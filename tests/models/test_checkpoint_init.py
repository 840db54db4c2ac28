"""Random-weight checkpoints: transformers loads them offline and they carry each
architecture's features; the tiny presets are fit for greedy token-for-token checks."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from splitserve import up
from splitserve.models import checkpoint_init
from splitserve.models.checkpoint_init import (
    ARCHITECTURES,
    PRESETS,
    build_config,
    count_parameters,
    init_checkpoint,
)
from splitserve.models.tokenizer_build import build_tokenizer

PROMPTS = ["The model", "Hello world, this is a test of the", "日本語 🙂 héllo", "12345 + 678 ="]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {arch: init_checkpoint(tmp_path_factory.mktemp(arch), arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def tiny_models(tiny_dirs):
    return {
        arch: AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        for arch, path in tiny_dirs.items()
    }


def _tensors(path):
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_transformers_loads_the_same_tensors(arch, tiny_dirs, tiny_models):
    model, tensors = tiny_models[arch], _tensors(tiny_dirs[arch])
    config = json.loads((tiny_dirs[arch] / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__]
    assert config["dtype"] == config["torch_dtype"] == "float32"

    state = model.state_dict()
    expected_names = set(state) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    assert set(tensors) == expected_names
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name
    if model.config.tie_word_embeddings:
        assert torch.equal(state["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert model.num_parameters() == count_parameters(model.config)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_presets_exercise_their_architecture(arch, tiny_dirs):
    config = AutoConfig.from_pretrained(tiny_dirs[arch], local_files_only=True)
    names = set(_tensors(tiny_dirs[arch]))
    assert config.num_attention_heads > config.num_key_value_heads  # GQA everywhere
    assert config.max_position_embeddings >= 1024
    has_bias = "model.layers.0.self_attn.q_proj.bias" in names
    has_qk_norm = "model.layers.0.self_attn.q_norm.weight" in names
    assert has_bias == (arch == "qwen2")
    assert has_qk_norm == (arch == "qwen3")
    assert config.tie_word_embeddings == (arch in ("qwen2", "qwen3"))
    assert ("lm_head.weight" in names) != config.tie_word_embeddings
    if arch == "llama":
        assert config.rope_parameters["rope_type"] == "llama3"
        assert config.rope_parameters["original_max_position_embeddings"] < config.max_position_embeddings
    if arch == "qwen3":
        assert config.head_dim != config.hidden_size // config.num_attention_heads
    if arch == "mistral":
        assert config.sliding_window == 64
    else:
        assert getattr(config, "sliding_window", None) is None


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_decoding_is_well_separated(arch, tiny_dirs, tiny_models):
    """The engine is checked token for token against transformers: no near-ties, no one-token loops."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[arch], local_files_only=True)
    gaps = []
    for prompt in PROMPTS:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = tiny_models[arch].generate(
                input_ids,
                do_sample=False,
                max_new_tokens=10,
                min_new_tokens=10,
                output_logits=True,
                return_dict_in_generate=True,
            )
        new_tokens = out.sequences[0, input_ids.shape[1] :].tolist()
        assert len(set(new_tokens)) > 1, (prompt, new_tokens)
        for logits in out.logits:
            top2 = logits[0].topk(2).values
            gaps.append((top2[0] - top2[1]).item())
    # Gaussian logits over ~1k tokens: about 0.1% of steps have a gap under 1e-3 (one of
    # these 40 does for llama), far above fp32 noise (~1e-6); the typical gap is ~0.4.
    gaps = torch.tensor(gaps)
    assert gaps.min() > 1e-4
    assert (gaps > 1e-2).float().mean() >= 0.9
    assert gaps.median() > 0.1


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tokenizer_matches_config_and_family(arch, tiny_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[arch], local_files_only=True)
    config = json.loads((tiny_dirs[arch] / "config.json").read_text())
    generation = json.loads((tiny_dirs[arch] / "generation_config.json").read_text())
    assert len(tokenizer) <= config["vocab_size"]
    assert config["eos_token_id"] == tokenizer.eos_token_id
    assert config["eos_token_id"] in generation["eos_token_id"]
    assert "do_sample" not in generation  # plain generate() stays greedy

    ids = tokenizer("hello world")["input_ids"]
    if arch in ("llama", "mistral"):
        assert config["bos_token_id"] == tokenizer.bos_token_id == ids[0]
    else:  # Qwen: no BOS on encode; bos_token_id names <|endoftext|>, as in Qwen's configs
        assert tokenizer.bos_token is None
        assert config["bos_token_id"] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
        assert config["bos_token_id"] not in ids

    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    for message in MESSAGES:
        assert message["content"] in prompt
    assert prompt.endswith({"llama": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                            "qwen2": "<|im_start|>assistant\n", "qwen3": "<|im_start|>assistant\n",
                            "mistral": "Bye [/INST]"}[arch])
    inline = json.loads((tiny_dirs[arch] / "tokenizer_config.json").read_text())["chat_template"]
    assert inline == tokenizer.chat_template


_TOKENIZER = build_tokenizer()


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_text_round_trips(text):
    ids = _TOKENIZER.encode(text, add_special_tokens=False)
    assert _TOKENIZER.decode(ids) == text


def test_multibyte_characters_split_across_tokens():
    text = "héllo wörld 日本語 🙂"
    ids = _TOKENIZER.encode(text, add_special_tokens=False)
    assert _TOKENIZER.decode(ids) == text
    emoji_ids = _TOKENIZER.encode("🙂", add_special_tokens=False)
    assert len(emoji_ids) > 1  # its 4 UTF-8 bytes are not one token
    assert "\ufffd" in _TOKENIZER.decode(emoji_ids[:1])


def test_tokenizer_is_deterministic_across_processes():
    # Another interpreter, another hash seed: training must not depend on either.
    code = "from splitserve.models.tokenizer_build import build_tokenizer; print(build_tokenizer().backend_tokenizer.to_str())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other.strip() == _TOKENIZER.backend_tokenizer.to_str()
    assert len(_TOKENIZER) == 1024
    assert len(build_tokenizer(512, arch="qwen3")) == 512
    with pytest.raises(ValueError, match="too small"):
        build_tokenizer(200)


def _file_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_same_seed_same_files_different_seed_different_weights(tmp_path):
    small = {"num_hidden_layers": 1}
    a = init_checkpoint(tmp_path / "a", "qwen3", seed=7, overrides=small)
    b = init_checkpoint(tmp_path / "b", "qwen3", seed=7, overrides=small)
    c = init_checkpoint(tmp_path / "c", "qwen3", seed=8, overrides=small)
    assert _file_bytes(a) == _file_bytes(b)
    tensors_a, tensors_c = _tensors(a), _tensors(c)
    assert all(not torch.equal(tensors_a[name], tensors_c[name]) for name in tensors_a)
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_overrides_keep_each_tensor_and_bf16_rounds_fp32(tmp_path):
    full = _tensors(init_checkpoint(tmp_path / "full", "llama"))
    one_layer = init_checkpoint(
        tmp_path / "one", "llama", dtype="bf16", overrides={"num_hidden_layers": 1, "rope_theta": 1e4}
    )
    config = json.loads((one_layer / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["dtype"] == "bfloat16"
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 1e4
    for name, tensor in _tensors(one_layer).items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, full[name].to(torch.bfloat16)), name


def test_sharded_checkpoint_loads(tmp_path):
    overrides = {"num_hidden_layers": 2}
    sharded = init_checkpoint(tmp_path / "sharded", "qwen2", overrides=overrides, max_shard_bytes=100_000)
    single = init_checkpoint(tmp_path / "single", "qwen2", overrides=overrides)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 2 and not (sharded / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in _tensors(sharded).values())
    for name, file in index["weight_map"].items():
        assert name in load_file(sharded / file)

    model = AutoModelForCausalLM.from_pretrained(sharded, local_files_only=True)
    reference = _tensors(single)
    for name, tensor in reference.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'gpt2'.*llama"):
        init_checkpoint(tmp_path / "x", "gpt2")
    with pytest.raises(ValueError, match="'huge'.*tiny"):
        init_checkpoint(tmp_path / "x", "llama", "huge")
    with pytest.raises(ValueError, match="no 'qwen3' variant"):
        init_checkpoint(tmp_path / "x", "qwen3", "llama-3.1-8b")
    with pytest.raises(ValueError, match="num_hidden_layer"):
        init_checkpoint(tmp_path / "x", "llama", overrides={"num_hidden_layer": 1})
    with pytest.raises(ValueError, match="eos_token_id"):
        init_checkpoint(tmp_path / "x", "llama", overrides={"eos_token_id": 3})
    with pytest.raises(ValueError, match="dtype"):
        init_checkpoint(tmp_path / "x", "llama", dtype="int3")
    assert not (tmp_path / "x").exists()  # nothing written for bad arguments


def test_non_empty_directory_needs_overwrite(tmp_path):
    out = init_checkpoint(tmp_path / "ckpt", "mistral", overrides={"num_hidden_layers": 1}, max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").exists()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        init_checkpoint(out, "mistral")
    init_checkpoint(out, "mistral", overrides={"num_hidden_layers": 1}, overwrite=True)
    # The old shards and index are gone; only the new single file remains.
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left beside it


def _fail_after_the_first_shard(monkeypatch):
    def write_then_fail(out, *args):
        (out / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the weights

    monkeypatch.setattr(checkpoint_init, "_write_weights", write_then_fail)


def test_an_interrupted_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    _fail_after_the_first_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        init_checkpoint(tmp_path / "ckpt", "llama")
    assert list(tmp_path.iterdir()) == []  # no config.json without weights, no temporary folder


def test_an_interrupted_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    out = init_checkpoint(tmp_path / "ckpt", "llama", overrides={"num_hidden_layers": 1})
    before = _file_bytes(out)
    _fail_after_the_first_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        init_checkpoint(out, "llama", seed=3, overwrite=True)
    assert _file_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_up_rewrites_a_demo_folder_left_half_written(tmp_path, monkeypatch, capsys):
    # An older release could leave the demo folder holding config.json alone; `up` then failed
    # on every run until the folder was deleted by hand.
    demo = tmp_path / "demo-llama-tiny"
    demo.mkdir()
    (demo / "config.json").write_text(json.dumps(build_config("llama", "tiny").to_dict()))
    monkeypatch.setattr(up, "DEMO_DIR", demo)
    assert up.demo_checkpoint() == demo
    assert "writing the random-weight demo checkpoint" in capsys.readouterr().out
    AutoModelForCausalLM.from_pretrained(demo, local_files_only=True)
    AutoTokenizer.from_pretrained(demo, local_files_only=True)
    written = _file_bytes(demo)
    assert up.demo_checkpoint() == demo  # whole now: used as it is, silently
    assert capsys.readouterr().out == "" and _file_bytes(demo) == written


# Published sizes; the counts come from the config alone, nothing is allocated.
@pytest.mark.parametrize(
    "preset, arch, billions",
    [
        ("llama-3.2-1b", "llama", 1.24),
        ("llama-3.2-3b", "llama", 3.21),
        ("llama-3.1-8b", "llama", 8.03),
        ("qwen2.5-0.5b", "qwen2", 0.494),
        ("qwen2.5-7b", "qwen2", 7.61),
        ("qwen3-0.6b", "qwen3", 0.6),
        ("qwen3-8b", "qwen3", 8.19),
        ("mistral-7b", "mistral", 7.24),
        ("mistral-7b-v0.3", "mistral", 7.25),
    ],
)
def test_real_presets_have_their_published_size(preset, arch, billions):
    config = build_config(arch, preset)
    assert count_parameters(config) == pytest.approx(billions * 1e9, rel=0.01)
    assert config.dtype == torch.bfloat16
    assert config.vocab_size > 100_000 or arch == "mistral"


def test_every_preset_is_listed():
    expected = {"tiny", "llama-3.2-1b", "llama-3.1-8b", "qwen3-0.6b", "qwen3-8b", "qwen2.5-0.5b", "mistral-7b"}
    assert expected <= set(PRESETS)
    assert PRESETS["tiny"].architectures == ARCHITECTURES


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_generation_is_deterministic(tmp_path):
    a = init_checkpoint(tmp_path / "a", "llama", device="cuda")
    b = init_checkpoint(tmp_path / "b", "llama", device="cuda")
    assert _file_bytes(a) == _file_bytes(b)
    AutoModelForCausalLM.from_pretrained(a, local_files_only=True)
