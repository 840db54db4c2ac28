"""Paged attention for prefill and mixed batches: causal flash attention over the paged cache.

Each request's new tokens attend to everything before them in its cache (a prefix-cache
hit, earlier chunks of its prompt, KV pulled from another worker) and causally to one
another; the step's K/V are written to the cache first. One program per (query tile,
query head): a tile is up to PREFILL_BLOCK_M consecutive query rows of one request
(``with_device_tensors`` cuts the tiles), so the batch is ragged without padding. An fp8
cache is read as in paged_decode.py: K's scale folded into the scores, V's into the output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.attention_metadata import PREFILL_BLOCK_M, AttentionMetadata
from splitserve.kernels.kv_quant import check_kv_scale
from splitserve.kernels.paged_decode import NO_WINDOW, _check_kv_layer


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, H, D]
    kv_ptr,  # one layer's view: [num_blocks, Hkv, 2, block_size, D]
    out_ptr,  # [T, H, D]
    block_table_ptr,  # [R, max_blocks] int32
    query_start_ptr,  # [R + 1] int32
    context_lens_ptr,  # [R] int32
    tile_request_ptr,  # [num_tiles] int32
    tile_start_ptr,  # [num_tiles] int32
    kv_scale_ptr,  # [2] fp32 (K, V), read when KV_FP8
    scale_log2e,
    sliding_window,
    stride_qt,
    stride_qh,
    stride_kvb,
    stride_kvh,
    stride_kvkv,
    stride_kvt,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    v_scale = 1.0
    if KV_FP8:
        scale_log2e = scale_log2e * tl.load(kv_scale_ptr)
        v_scale = tl.load(kv_scale_ptr + 1)
    r = tl.load(tile_request_ptr + tile)
    m0 = tl.load(tile_start_ptr + tile)
    q_lo = tl.load(query_start_ptr + r)
    q_len = tl.load(query_start_ptr + r + 1) - q_lo
    ctx = tl.load(context_lens_ptr + r)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m
    row_valid = rows < q_len
    d_mask = offs_d < HEAD_DIM
    q_pos = ctx - q_len + rows  # each query's position in its sequence
    q_rows = (q_lo + rows).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=row_valid[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]

    # Keys this tile needs: from the window's start for its first row to its last row's position.
    first_pos = ctx - q_len + m0
    key_lo = tl.maximum(first_pos - sliding_window + 1, 0)
    key_hi = ctx - q_len + tl.minimum(m0 + BLOCK_M, q_len)
    kv_head = kv_ptr + (h // GROUP) * stride_kvh
    table = block_table_ptr + r.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(key_lo, key_hi, BLOCK_N):
        tok = start + offs_n
        valid = tok < key_hi
        block = tl.load(table + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = block * stride_kvb + (tok % BLOCK_SIZE) * stride_kvt
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(kv_head + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(kv_head + stride_kvkv + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        attend = valid[None, :] & (tok[None, :] <= q_pos[:, None]) & (tok[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(attend, s * scale_log2e, float("-inf"))  # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row may see no key of this tile yet (its window starts later): keep it at zero, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc * v_scale / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & d_mask[None, :],
    )


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H, D], head_dim contiguous
    kv_layer: torch.Tensor,  # [num_blocks, Hkv, 2, block_size, D], the step's K/V already written
    meta: AttentionMetadata,  # with its device tensors (with_device_tensors)
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,  # [T, H, D]
    kv_scale: torch.Tensor | None = None,  # [2] fp32: an fp8 cache's K and V scales
) -> torch.Tensor:
    """Causal attention of every query row over its request's cached tokens. Returns [T, H, D]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_layer.shape[1], kv_layer.shape[3]
    _check_kv_layer(kv_layer, num_kv_heads, head_dim)
    if q.stride(2) != 1:
        raise ValueError("q's head_dim must be contiguous")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    check_kv_scale(kv_layer, kv_scale)
    if q.dtype != kv_layer.dtype and kv_scale is None:
        raise ValueError(f"q is {q.dtype} but the KV cache is {kv_layer.dtype}")
    tensors = (meta.block_table_tensor, meta.query_start_loc_tensor, meta.context_lens_tensor, meta.tile_request, meta.tile_start)
    if any(t is None or t.dtype != torch.int32 for t in tensors):
        raise ValueError("the metadata's device tensors are missing or not int32 (see with_device_tensors)")
    if meta.block_table_tensor.stride(1) != 1:
        raise ValueError("block_table rows must be contiguous")
    if out is None:
        out = q.new_empty(q.shape)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with head_dim contiguous")
    num_tiles = meta.tile_request.shape[0]
    if num_tiles == 0:
        return out
    ieee = q.dtype == torch.float32
    block_d = triton.next_power_of_2(head_dim)
    _prefill_kernel[(num_tiles, num_heads)](
        q, kv_layer, out, meta.block_table_tensor, meta.query_start_loc_tensor, meta.context_lens_tensor,
        meta.tile_request, meta.tile_start, kv_scale if kv_scale is not None else meta.tile_start, scale * 1.4426950408889634, sliding_window or NO_WINDOW,
        q.stride(0), q.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        meta.block_table_tensor.stride(0), out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=32 if ieee or block_d > 128 else 64,
        IEEE=ieee, KV_FP8=kv_scale is not None, num_warps=4, num_stages=2 if ieee else 3,
    )  # fmt: skip
    return out
