"""Reading checkpoints whose linear weights are already FP8, as Hugging Face tools write them.

``config.json``'s ``quantization_config`` says so. Two layouts of the scales are read:

- ``quant_method: "fp8"`` (transformers' fine-grained FP8, DeepSeek-V3 and Qwen3-FP8 style):
  ``<layer>.weight`` in float8 e4m3 and ``<layer>.weight_scale_inv`` of shape
  [ceil(N / bn), ceil(K / bk)] for ``weight_block_size`` [bn, bk]; the real weight is
  ``weight * weight_scale_inv`` block by block (the name notwithstanding, it multiplies).
- ``compressed-tensors`` (llm-compressor's FP8 / FP8_DYNAMIC) and ``fbgemm_fp8``:
  ``<layer>.weight`` in float8 e4m3 and ``<layer>.weight_scale``, one per tensor ([] or [1])
  or per output channel ([N] or [N, 1]); ``input_scale`` (static activations) is not used,
  as activations are quantized per token at run time.

Each weight is dequantized to fp32 as it is read, the shard a rank needs is cut from that, and
the model quantizes its layers again per output channel (models/fp8.py); a per-channel
checkpoint comes back to the same fp8 values.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from splitserve.models.arch import CheckpointError

FP8_METHODS = ("fp8", "compressed-tensors", "fbgemm_fp8")
_SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".input_scale")


def checkpoint_quantization(model_dir: Path) -> dict | None:
    """The checkpoint's ``quantization_config`` when it is an FP8 one; raises for a method this loader cannot read."""
    qc = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method not in FP8_METHODS:
        raise CheckpointError(f"{model_dir}: quantization_config quant_method {method!r} is not supported; supported: {', '.join(FP8_METHODS)}")
    if qc.get("activation_scheme", "dynamic") != "dynamic" and method == "fp8":
        raise CheckpointError(f"{model_dir}: only dynamic activation scales are supported, not {qc.get('activation_scheme')!r}")
    return qc


def is_scale_tensor(name: str) -> bool:
    return name.endswith(_SCALE_SUFFIXES)


class Fp8CheckpointReader:
    """Gives each weight of an FP8 checkpoint dequantized (fp32); other tensors as they are."""

    def __init__(self, files: list[Path], config: dict) -> None:
        self.block = tuple(config.get("weight_block_size") or ()) or None
        self._scale_file: dict[str, Path] = {}
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name.endswith((".weight_scale_inv", ".weight_scale")):
                        self._scale_file[name] = path

    def get(self, f, name: str):
        """What the model's loader slices: ``f.get_slice(name)``, or a dequantized tensor for an fp8 weight."""
        sl = f.get_slice(name)
        if sl.get_dtype() not in ("F8_E4M3", "F8_E5M2"):
            return sl
        base = name[: -len("weight")]
        scale_name = next((base + s for s in ("weight_scale_inv", "weight_scale") if base + s in self._scale_file), None)
        if scale_name is None:
            raise CheckpointError(f"fp8 tensor {name} has no weight_scale or weight_scale_inv")
        with safe_open(str(self._scale_file[scale_name]), framework="pt", device="cpu") as sf:
            scale = sf.get_tensor(scale_name).float()
        return dequantize(f.get_tensor(name), scale, self.block if scale_name.endswith("_inv") else None, name)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, name: str) -> torch.Tensor:
    rows, cols = weight.shape
    w = weight.float()
    if block is not None:
        bn, bk = block
        if scale.shape != (-(-rows // bn), -(-cols // bk)):
            raise CheckpointError(f"{name}: block scales of shape {tuple(scale.shape)} do not tile [{rows}, {cols}] in {bn}x{bk} blocks")
        return w * scale.repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]
    if scale.numel() == 1:
        return w * scale.reshape(())
    if scale.numel() == rows:
        return w * scale.reshape(rows, 1)
    raise CheckpointError(f"{name}: a weight_scale of shape {tuple(scale.shape)} is neither per tensor nor per output channel of [{rows}, {cols}]")
