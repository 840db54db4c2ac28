"""The scales of an fp8 KV cache: one for K and one for V per layer, from the checkpoint or measured.

A checkpoint quantized for an fp8 KV cache (llm-compressor, ModelOpt, vLLM's tools) stores them
as ``model.layers.{i}.self_attn.k_scale`` / ``v_scale`` (older ones one ``kv_scale`` for both;
compressed-tensors ones ``self_attn.k_proj.output_scale`` / ``v_proj.output_scale``).
Without them they are measured once at start-up: a fixed calibration prompt runs through the
model with a cache in the model's dtype, and each layer's largest |K| and |V| times
``CALIBRATION_MARGIN`` is mapped onto fp8's largest value, rounded up to a power of two. The
prompt, and so the scales, are the same in every worker of a model; TP ranks take the maximum
over their heads, so the scales are the model's whatever the TP size, and a power of two leaves
small numeric differences between devices no room to change them. Peers still compare them at
the KV handshake (``fingerprint``): blocks written under other scales would be misread.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from safetensors import safe_open

from splitserve.kernels.attention_metadata import AttentionMetadata, with_device_tensors
from splitserve.kernels.kv_quant import FP8_MAX
from splitserve.models.arch import CheckpointError

# Other spellings of the same scales -> ours.
_ALIASES = {"self_attn.k_proj.output_scale": "self_attn.k_scale", "self_attn.v_proj.output_scale": "self_attn.v_scale"}
CALIBRATION_TOKENS = 256
CALIBRATION_MARGIN = 2.0  # later tokens may exceed what the calibration prompt showed


def checkpoint_kv_scales(model_dir: Path, num_layers: int) -> torch.Tensor | None:
    """[num_layers, 2] fp32 (K, V) from the checkpoint, or None when it has none."""
    found: dict[str, float] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                ours = next((name[: -len(alias)] + canonical for alias, canonical in _ALIASES.items() if name.endswith(alias)), name)
                if ours.endswith(("self_attn.k_scale", "self_attn.v_scale", "self_attn.kv_scale")):
                    found[ours] = float(f.get_tensor(name).float().max())
    if not found:
        return None
    scales = torch.empty(num_layers, 2)
    for i in range(num_layers):
        p = f"model.layers.{i}.self_attn."
        both = found.get(p + "kv_scale")
        k, v = found.get(p + "k_scale", both), found.get(p + "v_scale", both)
        if k is None or v is None:
            raise CheckpointError(f"{model_dir}: KV cache scales given for some layers but not layer {i}")
        scales[i, 0], scales[i, 1] = k, v
    if not torch.all(scales > 0):
        raise CheckpointError(f"{model_dir}: KV cache scales must be positive")
    return scales


def calibration_token_ids(vocab_size: int, num_tokens: int) -> list[int]:
    return [(i * 7919 + 13) % vocab_size for i in range(num_tokens)]


@torch.inference_mode()
def measure_kv_scales(model, backend, block_size: int, max_model_len: int) -> torch.Tensor:
    """[num_layers, 2] fp32 scales from one run of the calibration prompt (see the module docstring).

    Every rank of a TP group must call it at the same time (the forward and the max are collective).
    """
    attn = model.layers[0].self_attn
    cfg, device = model.cfg, model.embed_tokens.weight.device
    num_tokens = min(CALIBRATION_TOKENS, max_model_len)
    num_blocks = -(-num_tokens // block_size)
    dtype = model.embed_tokens.weight.dtype
    cache = torch.zeros((num_blocks, attn.num_kv_heads, cfg.num_layers, 2, block_size, attn.head_dim), dtype=dtype, device=device)
    positions = torch.arange(num_tokens, device=device)
    meta = AttentionMetadata(
        query_start_loc=[0, num_tokens],
        context_lens=[num_tokens],
        block_tables=[list(range(num_blocks))],
        slot_block=positions // block_size,
        slot_offset=positions % block_size,
        block_size=block_size,
    )
    if backend.needs_device_tensors:
        meta = with_device_tensors(meta, device)
    ids = torch.tensor(calibration_token_ids(cfg.vocab_size, num_tokens), device=device)
    model(ids, positions, cache, meta, backend)
    # [num_layers, 2]: the largest |K| and |V| of each layer over this rank's heads.
    amax = cache.abs().amax(dim=(0, 1, 4, 5)).float()
    tp = attn.qkv_proj.tp
    if tp.size > 1:
        torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=tp.group)
    return amax.cpu().apply_(_power_of_two_scale)


def _power_of_two_scale(amax: float) -> float:
    if not math.isfinite(amax) or amax <= 0:
        return 1.0
    return 2.0 ** math.ceil(math.log2(amax * CALIBRATION_MARGIN / FP8_MAX))


def fingerprint(scales: torch.Tensor | None) -> str:
    """A short digest of the scales, compared at the KV handshake ("" for a cache without scales)."""
    if scales is None:
        return ""
    return hashlib.sha256(scales.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]
