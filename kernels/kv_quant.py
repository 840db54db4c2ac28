"""FP8 (e4m3) KV cache values: what is stored is ``x / scale`` saturated to the format's range.

One scale per layer for K and one for V (``kv_scale``: a [2] fp32 tensor on the cache's
device, K's first). The reference backend uses these helpers; the Triton kernels do the same
arithmetic inline (kernels/write_kv.py, paged_decode.py, paged_prefill.py).
"""
from __future__ import annotations

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_KV_DTYPE).max  # 448; e4m3fn has no infinity, so values are clamped, never overflowed


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` in fp32, saturated to +-448, as float8 e4m3."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def dequantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x.float() * scale).to(dtype)


def check_kv_scale(kv_layer: torch.Tensor, kv_scale: torch.Tensor | None) -> None:
    """An fp8 cache needs its [2] fp32 scales on its device; any other cache takes none."""
    if kv_layer.dtype == FP8_KV_DTYPE:
        if kv_scale is None or kv_scale.shape != (2,) or kv_scale.dtype != torch.float32 or kv_scale.device != kv_layer.device:
            raise ValueError(f"an fp8 KV cache needs kv_scale: a [2] float32 tensor on {kv_layer.device}, got "
                             f"{None if kv_scale is None else (tuple(kv_scale.shape), kv_scale.dtype, kv_scale.device)}")
    elif kv_scale is not None:
        raise ValueError(f"kv_scale is only for an fp8 KV cache, not {kv_layer.dtype}")
