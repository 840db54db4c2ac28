"""RMSNorm, optionally fused with the residual add before it: one read and one write per row.

Computes exactly what ``splitserve.models.layers.RMSNorm`` does, in its order and
roundings (the sum rounded to the activations' dtype, normalised in fp32, rounded,
then scaled by the weight in the activations' dtype), so eager, fused and CPU runs agree.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(
    x_ptr,  # rows of N: [R // INNER, INNER, N] with strides (stride_x0, stride_x1, 1)
    residual_ptr,  # [R, N] contiguous, read when HAS_RESIDUAL
    weight_ptr,  # [N]
    out_ptr,  # [R, N] contiguous
    sum_ptr,  # [R, N] contiguous: x + residual, written when HAS_RESIDUAL
    stride_x0,
    stride_x1,
    eps,
    N: tl.constexpr,
    INNER: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + (r // INNER) * stride_x0 + (r % INNER) * stride_x1 + offs, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + r * N + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(dtype)
        tl.store(sum_ptr + r * N + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (xf * rstd).to(dtype).to(tl.float32) * w
    tl.store(out_ptr + r * N + offs, y.to(dtype), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [..., N], N contiguous; up to 3 dims
    weight: torch.Tensor,  # [N]
    eps: float,
    residual: torch.Tensor | None = None,  # shaped like x
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``. Outputs are new, contiguous."""
    n = x.shape[-1]
    if weight.shape != (n,) or weight.dtype != x.dtype:
        raise ValueError(f"weight must be [{n}] {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if x.stride(-1) != 1 or x.dim() not in (2, 3):
        raise ValueError(f"x must be 2-D or 3-D with its last dim contiguous, got {tuple(x.shape)} strides {x.stride()}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError("residual must match x in shape and dtype")
        residual = residual.contiguous()
    inner = x.shape[1] if x.dim() == 3 else 1
    stride_x1 = x.stride(1) if x.dim() == 3 else 0
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total = torch.empty_like(out) if residual is not None else out
    rows = x.numel() // n
    if rows:
        block = triton.next_power_of_2(n)
        _rmsnorm_kernel[(rows,)](
            x, residual if residual is not None else x, weight, out, total, x.stride(0), stride_x1, eps,
            N=n, INNER=inner, BLOCK=block, HAS_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, block // 256)),
        )  # fmt: skip
    return out if residual is None else (out, total)
