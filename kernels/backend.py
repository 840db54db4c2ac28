"""Picks the attention backend for a device: the reference on CPU, Triton kernels on CUDA.

flash-attn is an optional extra; its paged functions expect a [num_blocks, block_size,
num_kv_heads, head_dim] cache, which this project's layout (heads outside tokens, for
head-sliced transfers) is not, so CUDA runs the Triton kernels whether or not it is installed.
"""
from __future__ import annotations

from typing import Protocol

import torch

from splitserve.kernels.attention_metadata import AttentionMetadata
from splitserve.kernels.torch_attention import TorchAttention


class AttentionBackend(Protocol):
    name: str
    needs_device_tensors: bool  # reads AttentionMetadata's device tensors (see with_device_tensors)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        kv_scale: torch.Tensor | None = None,  # [2] fp32 (K, V) when the cache is fp8 (kernels/kv_quant.py)
    ) -> torch.Tensor: ...


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def select_backend(device: torch.device, name: str = "auto") -> AttentionBackend:
    """``auto``: Triton on a CUDA device when Triton is installed, else the reference."""
    device = torch.device(device)
    if name == "torch" or (name == "auto" and (device.type != "cuda" or not triton_available())):
        return TorchAttention()
    if name in ("auto", "triton") and device.type == "cuda" and triton_available():
        from splitserve.kernels.triton_attention import TritonAttention

        return TritonAttention()
    raise ValueError(f"attention backend {name!r} is not available on {device}")
