"""Paged attention for decode: one query token per request, K/V read through the block table.

GQA-aware: one program per (request, KV head, context split) computes every query
head of the group against each K/V tile it loads, so K/V are read once per group
rather than once per query head. An fp8 cache (kernels/kv_quant.py) is read as fp8 and
converted to the queries' dtype for the products; K's scale multiplies the scores and V's the
output, so the kernel does no per-element rescaling. The context is cut into ``num_splits`` parts
(flash-decoding) so that a small batch still fills the GPU; a second kernel merges
the parts' partial softmaxes. ``num_splits`` depends only on the batch shape, never
on the context lengths, so the launch is the same every step and a CUDA graph can
capture it; a request with a short context simply leaves some of its splits empty.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from splitserve.kernels.kv_quant import check_kv_scale

NO_WINDOW = 1 << 30  # a sliding window wider than any context


@triton.jit
def _decode_kernel(
    q_ptr,  # [B, H, D]
    kv_ptr,  # one layer's view: [num_blocks, Hkv, 2, block_size, D]
    block_table_ptr,  # [B, max_blocks] int32
    context_lens_ptr,  # [B] int32
    out_ptr,  # [B, H, D], written when NUM_SPLITS == 1
    part_acc_ptr,  # [B, H, NUM_SPLITS, D] fp32, unnormalised partial outputs
    part_ml_ptr,  # [B, H, NUM_SPLITS, 2] fp32, each split's running max (log2 units) and sum
    kv_scale_ptr,  # [2] fp32 (K, V), read when KV_FP8
    scale_log2e,
    sliding_window,
    stride_qb,
    stride_qh,
    stride_kvb,
    stride_kvh,
    stride_kvkv,
    stride_kvt,
    stride_bt,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # GROUP padded to a tensor-core tile (>= 16)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per paged KV block
    BLOCK_N: tl.constexpr,  # tokens per loop iteration
    NUM_SPLITS: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products, no tf32
    KV_FP8: tl.constexpr,  # the cache holds fp8 values over per-layer K/V scales
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    v_scale = 1.0
    if KV_FP8:
        scale_log2e = scale_log2e * tl.load(kv_scale_ptr)
        v_scale = tl.load(kv_scale_ptr + 1)
    ctx = tl.load(context_lens_ptr + b)
    first = tl.maximum(ctx - sliding_window, 0)
    num_tiles = tl.cdiv(ctx - first, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]
    kv_head = kv_ptr + kvh * stride_kvh
    table = block_table_ptr + b.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for tile in range(tile_lo, tile_hi):
        tok = first + tile * BLOCK_N + offs_n
        valid = tok < ctx
        block = tl.load(table + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = block * stride_kvb + (tok % BLOCK_SIZE) * stride_kvt  # [BLOCK_N]
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
        s = tl.where(valid[None, :], s * scale_log2e, float("-inf"))  # [BLOCK_G, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    acc = acc * v_scale
    o_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty context (a padding row) gives zeros
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=o_mask,
        )
    else:
        part = (b * (GROUP * tl.num_programs(1)) + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=o_mask)
        tl.store(part_ml_ptr + part * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=g_mask)


@triton.jit
def _merge_kernel(
    part_acc_ptr,  # [B, H, NUM_SPLITS, BLOCK_D] fp32
    part_ml_ptr,  # [B, H, NUM_SPLITS, 2] fp32
    out_ptr,  # [B, H, D]
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    base = b * tl.num_programs(1) + h
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.load(part_ml_ptr + (base * NUM_SPLITS + offs_s) * 2)
    sums = tl.load(part_ml_ptr + (base * NUM_SPLITS + offs_s) * 2 + 1)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
    total = tl.sum(sums * w, 0)
    acc = tl.load(part_acc_ptr + (base * NUM_SPLITS + offs_s)[:, None] * BLOCK_D + offs_d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@functools.cache
def _num_sms(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(num_requests: int, num_kv_heads: int) -> int:
    """Enough context splits for about two programs per SM; a power of two, 1 to 32.

    Measured on an H100 (bench/gpu_decode.py): aiming at four programs per SM instead
    gave batch 64 two splits, and its decode step got slower.
    """
    sms = _num_sms(torch.cuda.current_device()) if torch.cuda.is_available() else 132
    want = math.ceil(2 * sms / max(1, num_requests * num_kv_heads))
    return min(32, 1 << max(0, math.ceil(math.log2(want)))) if want > 1 else 1


def _check_kv_layer(kv_layer: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    if kv_layer.dim() != 5 or kv_layer.shape[1] != num_kv_heads or kv_layer.shape[2] != 2 or kv_layer.shape[4] != head_dim:
        raise ValueError(f"kv_layer must be [num_blocks, {num_kv_heads}, 2, block_size, {head_dim}], got {tuple(kv_layer.shape)}")
    if kv_layer.stride(4) != 1:
        raise ValueError("kv_layer's head_dim must be contiguous")


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D], head_dim contiguous
    kv_layer: torch.Tensor,  # [num_blocks, Hkv, 2, block_size, D]
    block_table: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32; 0 marks a padding row (its output is zeros)
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,  # [B, H, D]
    kv_scale: torch.Tensor | None = None,  # [2] fp32: an fp8 cache's K and V scales
) -> torch.Tensor:
    """Attention of each request's one new query over its first ``context_lens[b]`` cached tokens. Returns [B, H, D]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_layer.shape[1], kv_layer.shape[3]
    _check_kv_layer(kv_layer, num_kv_heads, head_dim)
    if q.stride(2) != 1:
        raise ValueError("q's head_dim must be contiguous")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    check_kv_scale(kv_layer, kv_scale)
    if q.dtype != kv_layer.dtype and kv_scale is None:
        raise ValueError(f"q is {q.dtype} but the KV cache is {kv_layer.dtype}")
    if block_table.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_table and context_lens must be int32")
    if block_table.dim() != 2 or block_table.shape[0] < batch or block_table.stride(1) != 1 or context_lens.shape[0] < batch:
        raise ValueError(f"block_table must be [>= {batch}, max_blocks] with contiguous rows and context_lens [>= {batch}]")
    group = num_heads // num_kv_heads
    num_splits = num_splits or default_num_splits(batch, num_kv_heads)
    if num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    block_d = triton.next_power_of_2(head_dim)
    if out is None:
        out = q.new_empty(q.shape)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with head_dim contiguous")
    if num_splits > 1:
        part_acc = torch.empty((batch, num_heads, num_splits, block_d), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((batch, num_heads, num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    ieee = q.dtype == torch.float32
    block_n = 32 if ieee or head_dim > 128 else 64
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, kv_layer, block_table, context_lens, out, part_acc, part_ml, kv_scale if kv_scale is not None else context_lens,
        scale * 1.4426950408889634, sliding_window or NO_WINDOW,
        q.stride(0), q.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        block_table.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, NUM_SPLITS=num_splits, IEEE=ieee,
        KV_FP8=kv_scale is not None, num_warps=4, num_stages=2,
    )  # fmt: skip
    if num_splits > 1:
        _merge_kernel[(batch, num_heads)](
            part_acc, part_ml, out, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits, num_warps=1,
        )  # fmt: skip
    return out
