"""Rotary position embedding applied to q and k in place, in one launch.

Matches ``splitserve.models.rope.RotaryEmbedding`` ("rotate half") with its roundings:
cos/sin are rounded to the activations' dtype, and each product and the sum are rounded
as the eager PyTorch ops round them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(x_ptr, stride_h, num_heads, c, s, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HALF)
    ptr = x_ptr + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
    dt = x1.dtype
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    o1 = (a * c).to(dt).to(tl.float32) - (b * s).to(dt).to(tl.float32)
    o2 = (b * c).to(dt).to(tl.float32) + (a * s).to(dt).to(tl.float32)
    tl.store(ptr, o1.to(dt), mask=mask)
    tl.store(ptr + HALF, o2.to(dt), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [T, Hk, D]
    positions_ptr,  # [T]
    cos_ptr,  # [max_positions, D] fp32; its two halves are equal
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    num_q_heads,
    num_k_heads,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    dmask = offs_d < HALF
    dt = q_ptr.dtype.element_ty
    c = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=dmask, other=0.0).to(dt).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * stride_cos + offs_d, mask=dmask, other=0.0).to(dt).to(tl.float32)[None, :]
    _rotate(q_ptr + t * stride_qt, stride_qh, num_q_heads, c, s, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate(k_ptr + t * stride_kt, stride_kh, num_k_heads, c, s, HALF, BLOCK_HK, BLOCK_HALF)


def apply_rotary_(
    positions: torch.Tensor,  # [T] integer
    q: torch.Tensor,  # [T, Hq, D], head_dim contiguous; rotated in place
    k: torch.Tensor,  # [T, Hk, D]
    cos: torch.Tensor,  # [max_positions, D] fp32
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_q_heads, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or k.dtype != q.dtype:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} disagree")
    if q.stride(2) != 1 or k.stride(2) != 1 or head_dim % 2:
        raise ValueError("head_dim must be even and contiguous in q and k")
    if cos.shape != sin.shape or cos.shape[1] != head_dim or cos.dtype != torch.float32:
        raise ValueError(f"cos/sin must be [max_positions, {head_dim}] fp32")
    if cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError("cos and sin must share strides, their last dim contiguous")
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions must be [{num_tokens}], got {tuple(positions.shape)}")
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
            num_q_heads, k.shape[1], HALF=half,
            BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
            BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
        )  # fmt: skip
    return q, k
