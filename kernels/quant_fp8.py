"""Per-row dynamic FP8 quantization of activations, in one launch: each row's largest |x| gives its
scale, and the row is stored as ``x / scale`` in e4m3, saturated to +-448.

Computes exactly what ``splitserve.models.fp8.quantize_rows`` computes (the amax is exact in any
dtype, the scale and the division are fp32, the rounding to e4m3 is to nearest even), in one
kernel instead of the four or five PyTorch launches that a decode step would pay per linear layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
MIN_SCALE = 1e-12


@triton.jit
def _quant_rows_kernel(
    x_ptr,  # [M, N], rows strided by stride_x, N contiguous
    out_ptr,  # [M, N] fp8, contiguous
    scale_ptr,  # [M] fp32
    stride_x,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    row = x_ptr + r * stride_x
    amax = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        x = tl.load(row + start + offs, mask=start + offs < N, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0) / FP8_MAX, MIN_SCALE)
    tl.store(scale_ptr + r, scale)
    for start in range(0, N, BLOCK):
        mask = start + offs < N
        x = tl.load(row + start + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
        tl.store(out_ptr + r * N + start + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, N] (last dim contiguous) -> (e4m3 values [M, N] contiguous, fp32 scales [M, 1])."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [M, N] with N contiguous, got {tuple(x.shape)} strides {x.stride()}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be fp32, fp16 or bf16, got {x.dtype}")
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = min(triton.next_power_of_2(n), 4096)
        _quant_rows_kernel[(rows,)](x, out, scale, x.stride(0), N=n, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return out, scale
