"""The GPU attention backend: Triton kernels over the paged KV cache.

Decode-only batches (one query per request) go to the split-context decode kernel,
whose launch depends only on the batch shape, so a CUDA graph can capture it;
anything with a prompt chunk in it goes to the paged prefill kernel. Both read the
metadata's device tensors (``with_device_tensors``), never its Python lists.
"""
from __future__ import annotations

import torch

from splitserve.kernels.attention_metadata import AttentionMetadata
from splitserve.kernels.paged_decode import default_num_splits, paged_decode_attention
from splitserve.kernels.paged_prefill import paged_prefill_attention
from splitserve.kernels.write_kv import write_kv_cache


class TritonAttention:
    name = "triton"
    needs_device_tensors = True

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
        write_kv_cache(k, v, kv_layer, meta.slot_block, meta.slot_offset, kv_scale)
        # Every request has at least one query row, so T == num_requests means one each.
        if q.shape[0] == meta.num_requests:
            num_splits = default_num_splits(meta.num_requests, kv_layer.shape[1])
            return paged_decode_attention(
                q, kv_layer, meta.block_table_tensor, meta.context_lens_tensor, scale, sliding_window, num_splits,
                kv_scale=kv_scale,
            )
        return paged_prefill_attention(q, kv_layer, meta, scale, sliding_window, kv_scale=kv_scale)
