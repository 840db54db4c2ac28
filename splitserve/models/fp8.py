"""FP8 (e4m3) linear layers: weights with one scale per output channel, activations with one per token.

``y = (x_q @ W_q^T) * x_scale * w_scale``, with ``x_q = x / x_scale`` quantized per token at
run time (dynamic: no calibration) and ``W_q = W / w_scale`` quantized once, at load. On a GPU
the product is ``torch._scaled_mm`` (fp8 tensor cores, the scales applied in its epilogue); the
CPU reference quantizes the same way and multiplies the fp8 values in fp32, so the two differ
only by accumulation order. The embeddings and the LM head stay in the model's dtype.
"""
from __future__ import annotations

import torch
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
_MIN_SCALE = 1e-12  # an all-zero row or token would otherwise divide by zero


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of [..., K] over its own scale: (fp8 values [..., K], fp32 scales [..., 1])."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_(min=_MIN_SCALE)
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _scaled_mm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # torch._scaled_mm wants both inner and output dims in multiples of 16.
    return x.is_cuda and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None, use_kernel: bool = False
) -> torch.Tensor:
    """``x`` [..., K] in the model's dtype; ``weight`` [N, K] fp8; ``weight_scale`` [N] fp32. Returns [..., N] in x's dtype.
    ``use_kernel``: quantize the activations with the Triton kernel (kernels/quant_fp8.py; CUDA tensors only)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if use_kernel and x2.is_cuda and x2.stride(-1) == 1:
        from splitserve.kernels.quant_fp8 import quantize_rows_fp8

        x_q, x_scale = quantize_rows_fp8(x2)
    else:
        x_q, x_scale = quantize_rows(x2)
    if _scaled_mm_fits(x2, weight):
        # Row-wise scales need a bf16 output; weight.t() is the column-major operand it asks for.
        y = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1), out_dtype=torch.bfloat16)
        y = y.to(x.dtype)
    else:
        y = ((x_q.float() @ weight.float().t()) * x_scale * weight_scale.view(1, -1)).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*lead, weight.shape[0])


def quantize_linear_(module: nn.Module) -> None:
    """Replaces ``module.weight`` [N, K] by its fp8 values and sets ``module.weight_scale`` [N] fp32."""
    w_q, scale = quantize_rows(module.weight.data)
    module.weight = nn.Parameter(w_q, requires_grad=False)
    module.weight_scale = scale.view(-1)


def quantize_model_fp8(model: nn.Module) -> None:
    """Every column- and row-parallel linear layer of ``model`` to fp8 (embeddings and LM head excepted)."""
    from splitserve.models.layers import ColumnParallelLinear, RowParallelLinear

    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and module.weight.dtype != FP8_DTYPE:
            quantize_linear_(module)
            if module.weight.is_cuda:
                torch.cuda.empty_cache()  # the bf16 copy is gone: let the KV cache have its memory


def is_fp8_quantized(model: nn.Module) -> bool:
    return any(getattr(m, "weight_scale", None) is not None for m in model.modules())
