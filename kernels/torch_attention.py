"""The reference attention backend: PyTorch SDPA over KV gathered from the paged cache.

Runs anywhere (it is the CPU path); the GPU backends are checked against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.kernels.attention_metadata import AttentionMetadata
from splitserve.kernels.kv_quant import check_kv_scale, dequantize, quantize


def write_kv(
    kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, kv_scale: torch.Tensor | None = None
) -> None:
    """``kv_layer``: [num_blocks, num_kv_heads, 2, block_size, head_dim]; ``k``, ``v``: [T, num_kv_heads, head_dim].
    An fp8 cache stores ``k / kv_scale[0]`` and ``v / kv_scale[1]`` (kernels/kv_quant.py)."""
    if kv_scale is not None:
        k, v = quantize(k, kv_scale[0]), quantize(v, kv_scale[1])
    kv_layer[meta.slot_block, :, 0, meta.slot_offset] = k
    kv_layer[meta.slot_block, :, 1, meta.slot_offset] = v


class TorchAttention:
    name = "torch"
    needs_device_tensors = False

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_layer: torch.Tensor,  # [num_blocks, num_kv_heads, 2, block_size, head_dim]
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        kv_scale: torch.Tensor | None = None,  # [2] fp32 (K, V): the cache is fp8 (kernels/kv_quant.py)
    ) -> torch.Tensor:
        check_kv_scale(kv_layer, kv_scale)
        write_kv(kv_layer, k, v, meta, kv_scale)
        out = torch.empty_like(q)
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        for i in range(meta.num_requests):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            ctx = meta.context_lens[i]
            blocks = meta.block_tables[i][: -(-ctx // meta.block_size)]
            cached = kv_layer[blocks].permute(2, 0, 3, 1, 4).reshape(2, -1, num_kv_heads, head_dim)[:, :ctx]
            if kv_scale is not None:
                cached = dequantize(cached, kv_scale.view(2, 1, 1, 1), q.dtype)
            q_pos = torch.arange(ctx - (end - start), ctx, device=q.device).unsqueeze(1)
            k_pos = torch.arange(ctx, device=q.device).unsqueeze(0)
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            out[start:end] = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1),
                cached[0].transpose(0, 1),
                cached[1].transpose(0, 1),
                attn_mask=mask,
                scale=scale,
                enable_gqa=True,
            ).transpose(0, 1)
        return out
