"""Loads a local Hugging Face checkpoint directory into a model, each rank reading only its shard."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from splitserve.models.arch import ArchConfig, CheckpointError, load_arch_config
from splitserve.models.fp8 import quantize_model_fp8
from splitserve.models.fp8_checkpoint import Fp8CheckpointReader, checkpoint_quantization
from splitserve.models.layers import TPGroup
from splitserve.models.llama import LlamaForCausalLM


def safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir} has no *.safetensors weights (only safetensors checkpoints are supported)")
    return files


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    tp: TPGroup = TPGroup(),
    max_positions: int | None = None,
    quantization: str | None = None,
) -> tuple[LlamaForCausalLM, ArchConfig]:
    """Builds the model for ``config.json`` and fills it from the safetensors files.

    Every parameter must be filled from the checkpoint; a missing tensor is an error.
    ``quantization``: "fp8" quantizes the linear layers (models/fp8.py), "none" keeps them in
    ``dtype``; None follows the checkpoint (an FP8 checkpoint stays FP8).
    """
    model_dir = Path(model_dir)
    cfg = load_arch_config(model_dir)
    dtype = dtype or cfg.torch_dtype
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, tp, max_positions)
    model = model.to_empty(device=device).to(dtype)
    # The RoPE tables are buffers computed at construction; meta tensors held no values.
    rope = type(model.rope)(cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
    model.rope.cos, model.rope.sin = rope.cos.to(device), rope.sin.to(device)
    targets = model.checkpoint_targets()
    loaded: set[str] = set()
    files = safetensors_files(model_dir)
    fp8_config = checkpoint_quantization(model_dir)
    fp8_reader = Fp8CheckpointReader(files, fp8_config) if fp8_config is not None else None
    # A progress bar on a terminal only (disable=None), and from the first rank only.
    progress = tqdm(total=_num_tensors(files), desc=f"loading {model_dir.name}", unit="tensor", disable=None if tp.rank == 0 else True,
                    leave=False)
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                progress.update()
                for module, shard, is_bias in targets.get(name, []):
                    sl = fp8_reader.get(f, name) if fp8_reader is not None else f.get_slice(name)
                    if hasattr(module, "load_shard"):
                        module.load_shard(shard, sl, is_bias)
                    else:
                        module.weight.data.copy_(sl[:])
                    loaded.add(f"{id(module)}:{shard}:{is_bias}")
    progress.close()
    missing = [
        name
        for name, entries in targets.items()
        for module, shard, is_bias in entries
        if f"{id(module)}:{shard}:{is_bias}" not in loaded and _needed(module, is_bias)
    ]
    if missing:
        raise CheckpointError(f"{model_dir}: checkpoint lacks tensors: {', '.join(sorted(set(missing))[:8])}")
    if quantization == "fp8" or (quantization is None and fp8_config is not None):
        quantize_model_fp8(model)
    return model.eval(), cfg


def _num_tensors(files: list[Path]) -> int:
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:  # reads the header only
            total += len(f.keys())
    return total


def _needed(module: torch.nn.Module, is_bias: bool) -> bool:
    return not is_bias or getattr(module, "bias", None) is not None
