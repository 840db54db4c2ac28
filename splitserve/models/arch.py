"""What the model code needs from a checkpoint's config.json, read and checked once."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class CheckpointError(ValueError):
    """The checkpoint directory is missing, incomplete or of an unsupported kind."""


@dataclass(frozen=True)
class ArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # rope_type and its parameters; None for plain RoPE
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]  # per layer; None: full attention
    torch_dtype: torch.dtype
    bos_token_id: int | None
    eos_token_ids: frozenset[int]


def _eos_ids(value) -> frozenset[int]:
    if value is None:
        return frozenset()
    return frozenset(value) if isinstance(value, list) else frozenset([value])


def load_arch_config(model_dir: str | Path) -> ArchConfig:
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {model_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json; is it a Hugging Face checkpoint directory?")
    cfg = json.loads(path.read_text())
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise CheckpointError(f"{path}: architectures {archs} not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

    # transformers 5 writes rope_parameters; older checkpoints have rope_theta + rope_scaling.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"{path}: rope type {rope_type!r} not supported; supported: {SUPPORTED_ROPE_TYPES}")
    rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}

    num_heads = cfg["num_attention_heads"]
    num_layers = cfg["num_hidden_layers"]
    sliding_window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if arch == "MistralForCausalLM":
        windows = tuple([sliding_window] * num_layers)
    elif layer_types:
        windows = tuple(sliding_window if t == "sliding_attention" else None for t in layer_types)
    elif cfg.get("use_sliding_window"):
        raise CheckpointError(f"{path}: use_sliding_window without layer_types is not supported")
    else:
        windows = tuple([None] * num_layers)

    dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return ArchConfig(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        sliding_windows=windows,
        torch_dtype=getattr(torch, dtype_name),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
    )
