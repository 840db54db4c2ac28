"""Random-weight checkpoints of real architectures, written as Hugging Face directories.

Demos and tests never download weights: they run on checkpoints written here, with the
real shapes of Llama 3.x, Qwen2.5, Qwen3 and Mistral (or a tiny variant of each) and a
tokenizer trained locally (``tokenizer_build``). ``transformers`` loads the result offline.

config.json is built from transformers' own config classes so that field names are right;
the weights are drawn and written here, tensor by tensor and shard by shard, so that an 8B
checkpoint never holds more than one shard in memory.

Init (tuned so the tiny presets suit greedy token-for-token checks in fp32): weight
matrices are N(0, 1/fan_in), close to HF's std 0.02 at real sizes (1/sqrt(4096) = 0.016);
o_proj and down_proj, which write into the residual stream, get 4x that, so the layers
rather than the token's own embedding dominate the last hidden state (with tied embeddings
a weak residual makes the model repeat its input token). Embeddings and lm_head are
N(0, (2/sqrt(hidden))^2): logits have std ~2, and the top-2 gap over a 1k vocabulary is
~0.4 typically, under 1e-3 in ~0.1% of steps, far above fp32 noise. Norm weights are
1 + N(0, 0.1^2) and biases N(0, 0.2^2), so code that skips them computes visibly wrong numbers.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from splitserve.config import parse_dtype
from splitserve.models.tokenizer_build import (
    TOKENIZER_STYLES,
    build_tokenizer,
    save_tokenizer,
    special_token_id,
)

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
}
_MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# Fields init_checkpoint sets itself: the dtype argument, the tokenizer's special-token ids.
_MANAGED_FIELDS = frozenset(
    {"architectures", "dtype", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id"}
)
TOKENIZER_VOCAB_SIZE = 1024  # the tiny presets' tokenizer; their few extra rows go unused


def tokenizer_vocab_size(preset: str, vocab_size: int) -> int:
    """Real-shape presets get a tokenizer as large as their output layer, so that every id a
    random model samples decodes to text (streaming and detokenizing cost what they would)."""
    return min(TOKENIZER_VOCAB_SIZE, vocab_size) if preset == "tiny" else vocab_size


DEFAULT_MAX_SHARD_BYTES = 2_000_000_000
_EMBEDDING_GAIN = 2.0  # logits std with unit-RMS final hidden states
_RESIDUAL_GAIN = 4.0  # measured: 1 left tied tiny models looping on one token
_NORM_NOISE_STD = 0.1
_BIAS_STD = 0.2


@dataclass(frozen=True)
class Preset:
    """Config fields of one model size, for each architecture it exists in.

    Rotary settings use the hub spelling (``rope_theta``, ``rope_scaling``).
    """

    name: str
    dtype: str  # default weight dtype
    fields_by_arch: dict[str, dict[str, Any]] = field(repr=False)

    @property
    def architectures(self) -> tuple[str, ...]:
        return tuple(self.fields_by_arch)

    def fields(self, arch: str) -> dict[str, Any]:
        if arch not in self.fields_by_arch:
            raise ValueError(
                f"preset {self.name!r} has no {arch!r} variant; it exists for {self.architectures}"
            )
        return copy.deepcopy(self.fields_by_arch[arch])


def _llama3_scaling(factor: float, original_max: int) -> dict[str, Any]:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": original_max}


def _shape(hidden, layers, heads, kv_heads, inter, vocab, **rest) -> dict[str, Any]:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab, **rest)


# Tiny variants each exercise their architecture's peculiarity; heads, kv heads,
# intermediate and vocab sizes divide by 2 and 4 so that tensor parallelism can split them.
# The llama3 scaling's original context (256) sits inside max_position_embeddings so all
# three of its frequency bands are in play.
_TINY = Preset(
    "tiny",
    "float32",
    {
        "llama": _shape(64, 2, 4, 2, 176, 1024, rope_theta=500000.0,
                        rope_scaling=_llama3_scaling(8.0, 256),
                        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False),
        # Qwen pads its embedding past the tokenizer (151936 rows for ~151.6k tokens); so does this.
        "qwen2": _shape(64, 2, 4, 2, 160, 1088, rope_theta=1000000.0, rope_scaling=None,
                        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=True),
        # head_dim 32 != 64 / 4, as Qwen3 sets head_dim independently of hidden_size.
        "qwen3": _shape(64, 3, 4, 2, 192, 1088, head_dim=32, rope_theta=1000000.0,
                        rope_scaling=None, max_position_embeddings=2048, rms_norm_eps=1e-6,
                        tie_word_embeddings=True),
        # A 64-token window so that tests can cross it; GQA 4:1.
        "mistral": _shape(128, 2, 8, 2, 256, 1024, head_dim=16, rope_theta=10000.0,
                          rope_scaling=None, sliding_window=64, max_position_embeddings=2048,
                          rms_norm_eps=1e-5, tie_word_embeddings=False),
    },
)


def _real(name: str, arch: str, **fields: Any) -> Preset:
    return Preset(name, "bfloat16", {arch: fields})


# Shapes from the public config.json of each model.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _TINY,
        _real("llama-3.2-1b", "llama", **_shape(2048, 16, 32, 8, 8192, 128256, head_dim=64,
              rope_theta=500000.0, rope_scaling=_llama3_scaling(32.0, 8192),
              max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True)),
        _real("llama-3.2-3b", "llama", **_shape(3072, 28, 24, 8, 8192, 128256, head_dim=128,
              rope_theta=500000.0, rope_scaling=_llama3_scaling(32.0, 8192),
              max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True)),
        _real("llama-3.1-8b", "llama", **_shape(4096, 32, 32, 8, 14336, 128256, head_dim=128,
              rope_theta=500000.0, rope_scaling=_llama3_scaling(8.0, 8192),
              max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False)),
        _real("qwen2.5-0.5b", "qwen2", **_shape(896, 24, 14, 2, 4864, 151936,
              rope_theta=1000000.0, rope_scaling=None, max_position_embeddings=32768,
              rms_norm_eps=1e-6, tie_word_embeddings=True)),
        _real("qwen2.5-7b", "qwen2", **_shape(3584, 28, 28, 4, 18944, 152064,
              rope_theta=1000000.0, rope_scaling=None, max_position_embeddings=32768,
              rms_norm_eps=1e-6, tie_word_embeddings=False)),
        _real("qwen3-0.6b", "qwen3", **_shape(1024, 28, 16, 8, 3072, 151936, head_dim=128,
              rope_theta=1000000.0, rope_scaling=None, max_position_embeddings=40960,
              rms_norm_eps=1e-6, tie_word_embeddings=True)),
        _real("qwen3-8b", "qwen3", **_shape(4096, 36, 32, 8, 12288, 151936, head_dim=128,
              rope_theta=1000000.0, rope_scaling=None, max_position_embeddings=40960,
              rms_norm_eps=1e-6, tie_word_embeddings=False)),
        # v0.1: the Mistral with a sliding window (v0.2 and later dropped it).
        _real("mistral-7b", "mistral", **_shape(4096, 32, 32, 8, 14336, 32000, head_dim=128,
              rope_theta=10000.0, rope_scaling=None, sliding_window=4096,
              max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False)),
        _real("mistral-7b-v0.3", "mistral", **_shape(4096, 32, 32, 8, 14336, 32768,
              head_dim=128, rope_theta=1000000.0, rope_scaling=None, sliding_window=None,
              max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    )
}


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor and how its values are drawn: mean + std * N(0, 1)."""

    name: str
    shape: tuple[int, ...]
    std: float
    mean: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def build_config(
    arch: str, preset: str = "tiny", *, dtype: str | None = None, overrides: dict | None = None
) -> PretrainedConfig:
    """The transformers config of a preset, with overrides applied; allocates no weights."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch {arch!r} is not one of {ARCHITECTURES}")
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not one of {sorted(PRESETS)}")
    config_class = _CONFIG_CLASSES[arch]
    fields = PRESETS[preset].fields(arch)
    overrides = dict(overrides or {})
    managed = _MANAGED_FIELDS & overrides.keys()
    if managed:
        raise ValueError(f"overrides may not set {sorted(managed)}: init_checkpoint sets them")
    # Rotary settings are patched through rope_theta / rope_scaling, as presets spell them.
    allowed = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs", "rope_parameters"}
    allowed |= {"rope_theta", "rope_scaling"}
    unknown = sorted(overrides.keys() - allowed)
    if unknown:
        raise ValueError(f"unknown {config_class.__name__} fields {unknown}; allowed: {sorted(allowed)}")
    fields.update(overrides)

    rope_scaling = fields.pop("rope_scaling") or {"rope_type": "default"}
    fields["rope_parameters"] = {**rope_scaling, "rope_theta": fields.pop("rope_theta")}
    heads, kv_heads = fields["num_attention_heads"], fields["num_key_value_heads"]
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if "head_dim" not in fields and fields["hidden_size"] % heads:
        raise ValueError(f"hidden_size {fields['hidden_size']} is not a multiple of num_attention_heads {heads}")

    style = TOKENIZER_STYLES[arch]
    tokenizer_size = tokenizer_vocab_size(preset, fields["vocab_size"])
    # Qwen has no BOS token but its config names <|endoftext|> as bos_token_id.
    bos_id = special_token_id(arch, style.bos_token or style.eos_token, tokenizer_size)
    eos_id = special_token_id(arch, style.eos_token, tokenizer_size)
    torch_dtype = parse_dtype(dtype or PRESETS[preset].dtype)
    return config_class(
        **fields,
        architectures=[_MODEL_CLASSES[arch]],
        dtype=str(torch_dtype).removeprefix("torch."),
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
    )


def tensor_specs(config: PretrainedConfig) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in file order, with HF parameter names."""
    hidden, vocab = config.hidden_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_size = config.num_attention_heads * head_dim
    kv_size = config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
    o_bias = getattr(config, "attention_bias", False)
    mlp_bias = getattr(config, "mlp_bias", False)

    def linear(name: str, out_features: int, in_features: int, bias: bool, gain: float = 1.0) -> list[TensorSpec]:
        specs = [TensorSpec(f"{name}.weight", (out_features, in_features), gain * in_features**-0.5)]
        if bias:
            specs.append(TensorSpec(f"{name}.bias", (out_features,), _BIAS_STD))
        return specs

    def norm(name: str, size: int) -> TensorSpec:
        return TensorSpec(f"{name}.weight", (size,), _NORM_NOISE_STD, mean=1.0)

    embedding_std = _EMBEDDING_GAIN / math.sqrt(hidden)
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), embedding_std)]
    for i in range(config.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        specs += linear(f"{attn}.q_proj", q_size, hidden, qkv_bias)
        specs += linear(f"{attn}.k_proj", kv_size, hidden, qkv_bias)
        specs += linear(f"{attn}.v_proj", kv_size, hidden, qkv_bias)
        specs += linear(f"{attn}.o_proj", hidden, q_size, o_bias, _RESIDUAL_GAIN)
        if config.model_type == "qwen3":  # RMSNorm over each head's q and k, before rotary
            specs += [norm(f"{attn}.q_norm", head_dim), norm(f"{attn}.k_norm", head_dim)]
        specs += linear(f"{mlp}.gate_proj", inter, hidden, mlp_bias)
        specs += linear(f"{mlp}.up_proj", inter, hidden, mlp_bias)
        specs += linear(f"{mlp}.down_proj", hidden, inter, mlp_bias, _RESIDUAL_GAIN)
        specs += [norm(f"model.layers.{i}.input_layernorm", hidden)]
        specs += [norm(f"model.layers.{i}.post_attention_layernorm", hidden)]
    specs.append(norm("model.norm", hidden))
    if not config.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (vocab, hidden), embedding_std))
    return specs


def count_parameters(config: PretrainedConfig) -> int:
    return sum(spec.numel for spec in tensor_specs(config))


def init_checkpoint(
    out_dir: str | Path,
    arch: str,
    preset: str = "tiny",
    *,
    dtype: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    overrides: dict | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Writes a random-weight checkpoint directory that transformers loads offline.

    The same seed and device give byte-identical files (CPU and CUDA generators draw
    different numbers). ``overrides`` patches config fields, e.g. ``{"num_hidden_layers": 1}``.
    A non-empty ``out_dir`` is refused unless ``overwrite``; then the folder is replaced.

    The files are written into a temporary folder beside ``out_dir`` and renamed into place,
    so ``out_dir`` holds a whole checkpoint or none: an interrupted write (Ctrl-C, a full
    disk) leaves no config.json without weights for a later run to trip over.
    """
    config = build_config(arch, preset, dtype=dtype, overrides=overrides)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    tokenizer = build_tokenizer(tokenizer_vocab_size(preset, config.vocab_size), arch=arch)
    style = TOKENIZER_STYLES[arch]
    if tokenizer.convert_tokens_to_ids(style.eos_token) != config.eos_token_id:
        raise RuntimeError("tokenizer and config disagree on eos_token_id")  # a bug here, not bad input

    out = Path(out_dir)
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.writing-", dir=out.parent))
    try:
        _write_config(staging, config)
        _write_weights(staging, tensor_specs(config), parse_dtype(config.dtype), seed, device, max_shard_bytes)
        end_of_turn_id = tokenizer.convert_tokens_to_ids(style.end_of_turn_token)
        generation = GenerationConfig(
            bos_token_id=config.bos_token_id,
            # Chat turns end on end-of-turn, documents on eos; generation stops on either.
            eos_token_id=sorted({config.eos_token_id, end_of_turn_id}),
            pad_token_id=tokenizer.pad_token_id,
        )  # no sampling defaults: a plain generate() on these checkpoints stays greedy
        generation.save_pretrained(staging)
        save_tokenizer(tokenizer, staging)
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace its checkpoint")


def _move_into_place(staging: Path, out: Path) -> None:
    """Renames the finished ``staging`` folder to ``out``; an old ``out`` is moved aside first
    (rename replaces an empty folder only) and deleted once the new one is in place."""
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the checkpoint from other users
    try:
        staging.replace(out)  # out absent or empty
        return
    except OSError:
        if not out.is_dir():
            raise
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    out.replace(old / out.name)
    staging.replace(out)
    shutil.rmtree(old, ignore_errors=True)


def _plan_shards(specs: list[TensorSpec], itemsize: int, max_shard_bytes: int) -> list[list[TensorSpec]]:
    # A tensor larger than max_shard_bytes gets a shard of its own, as in transformers.
    shards: list[list[TensorSpec]] = [[]]
    shard_bytes = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(spec)
        shard_bytes += nbytes
    return shards


def _draw(spec: TensorSpec, seed: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    # One generator per tensor, seeded from (seed, name): a tensor's values do not depend on
    # the shard layout or on the tensors before it, so a 1-layer override of a preset
    # shares its layer 0 with the full preset.
    digest = hashlib.sha256(f"{seed}/{spec.name}".encode()).digest()
    generator = torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    # Drawn in fp32 whatever the dtype, so a bf16 checkpoint is the fp32 one rounded.
    values = torch.empty(spec.shape, device=device, dtype=torch.float32)
    return values.normal_(spec.mean, spec.std, generator=generator).to(dtype).cpu()


def _write_weights(
    out: Path, specs: list[TensorSpec], dtype: torch.dtype, seed: int, device: str, max_shard_bytes: int
) -> None:
    shards = _plan_shards(specs, dtype.itemsize, max_shard_bytes)
    if len(shards) == 1:
        filenames = ["model.safetensors"]
    else:
        filenames = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    # An 8B preset takes minutes: a progress bar on a terminal, nothing in logs (disable=None).
    progress = tqdm(total=sum(spec.numel for spec in specs) * dtype.itemsize, desc="writing weights", unit="B", unit_scale=True,
                    disable=None, leave=False)
    for filename, shard in zip(filenames, shards):
        tensors = {}
        for spec in shard:
            tensors[spec.name] = _draw(spec, seed, dtype, device)
            progress.update(spec.numel * dtype.itemsize)
        save_file(tensors, out / filename, metadata={"format": "pt"})
        del tensors  # before the next shard is drawn: at most one shard is ever in memory
        # safetensors writes through a 0600 temporary file; give shards the mode that
        # config.json got from the umask, so other users (a serving pod) can read them.
        shutil.copymode(out / "config.json", out / filename)
        weight_map.update({spec.name: filename for spec in shard})
    progress.close()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(spec.numel for spec in specs) * dtype.itemsize},
            "weight_map": dict(sorted(weight_map.items())),
        }
        _write_json(out / "model.safetensors.index.json", index)


def _write_config(out: Path, config: PretrainedConfig) -> None:
    data = config.to_diff_dict()
    # transformers 5 reads rope_parameters and dtype; transformers 4 and most other readers
    # of hub checkpoints read rope_theta, rope_scaling and torch_dtype. Both spellings are
    # written, with the same values.
    rope = dict(data["rope_parameters"])
    data["rope_theta"] = rope.pop("rope_theta")
    data["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    data["torch_dtype"] = data["dtype"]
    _write_json(out / "config.json", data)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
