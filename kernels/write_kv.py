"""Writes the step's new K and V into the paged cache: one program per token, all its KV heads.

An fp8 cache stores ``k / k_scale`` and ``v / v_scale`` saturated to +-448 (kernels/kv_quant.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.kv_quant import check_kv_scale


@triton.jit
def _write_kv_kernel(
    k_ptr,  # [T, Hkv, D]
    v_ptr,  # [T, Hkv, D]
    kv_ptr,  # one layer's view: [num_blocks, Hkv, 2, block_size, D]
    slot_block_ptr,  # [T] int64; negative: a padding row, written nowhere
    slot_offset_ptr,  # [T] int64
    kv_scale_ptr,  # [2] fp32 (K, V), read when QUANT
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kvb,
    stride_kvh,
    stride_kvkv,
    stride_kvt,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr,  # the cache is fp8
):
    t = tl.program_id(0).to(tl.int64)
    block = tl.load(slot_block_ptr + t).to(tl.int64)
    offset = tl.load(slot_offset_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = kv_ptr + block * stride_kvb + offset * stride_kvt + offs_h[:, None] * stride_kvh + offs_d[None, :]
    mask = mask & (block >= 0)
    if QUANT:
        k = tl.clamp(k.to(tl.float32) / tl.load(kv_scale_ptr), -448.0, 448.0)
        v = tl.clamp(v.to(tl.float32) / tl.load(kv_scale_ptr + 1), -448.0, 448.0)
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kvkv, v.to(kv_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    k: torch.Tensor,  # [T, Hkv, D], head_dim contiguous
    v: torch.Tensor,  # [T, Hkv, D]
    kv_layer: torch.Tensor,  # [num_blocks, Hkv, 2, block_size, D]
    slot_block: torch.Tensor,  # [T] int64
    slot_offset: torch.Tensor,  # [T] int64
    kv_scale: torch.Tensor | None = None,  # [2] fp32: an fp8 cache's K and V scales
) -> None:
    check_kv_scale(kv_layer, kv_scale)
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if kv_layer.dim() != 5 or kv_layer.shape[1] != num_kv_heads or kv_layer.shape[2] != 2 or kv_layer.shape[4] != head_dim:
        raise ValueError(f"kv_layer must be [num_blocks, {num_kv_heads}, 2, block_size, {head_dim}], got {tuple(kv_layer.shape)}")
    if k.stride(2) != 1 or v.stride(2) != 1 or kv_layer.stride(4) != 1:
        raise ValueError("head_dim must be contiguous in k, v and the KV cache")
    if slot_block.shape[0] < num_tokens or slot_offset.shape[0] < num_tokens:
        raise ValueError(f"{num_tokens} tokens but {slot_block.shape[0]} slots")
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_layer, slot_block, slot_offset, kv_scale if kv_scale is not None else slot_block,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim), QUANT=kv_scale is not None,
        num_warps=1 if num_kv_heads * head_dim <= 512 else 4,
    )  # fmt: skip
