"""The fused RMSNorm(+residual) kernel computes what the model's RMSNorm computes."""
from __future__ import annotations

import pytest
import torch

from splitserve.models.layers import RMSNorm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# fp32 rounds the same up to the sum's order; bf16 may differ by one rounding step in a few elements.
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 8e-3}


def check_rmsnorm(shape, dtype, with_residual, strided, device="cuda", seed=0):
    from splitserve.kernels.rmsnorm import rms_norm

    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = shape[-1]
    norm = RMSNorm(n, 1e-5).to(device, dtype)
    norm.weight.data.copy_(1 + 0.1 * torch.randn(n, generator=gen))
    x = 3 * torch.randn(shape, generator=gen).to(device, dtype)
    if strided:  # a q view inside a fused qkv projection: [T, H, D] with a row stride past H * D
        x = torch.cat([x, torch.randn_like(x)], dim=1)[:, : shape[1]]
    residual = torch.randn(shape, generator=gen).to(device, dtype) if with_residual else None
    with torch.inference_mode():
        ref = norm(x, residual)
        out = rms_norm(x, norm.weight, norm.eps, residual)
    for o, r in zip(out if with_residual else [out], ref if with_residual else [ref]):
        assert not o.isnan().any()
        err = ((o.double() - r.double()).norm() / r.double().norm()).item()
        assert err < TOLERANCE[dtype], err
    if with_residual:
        assert torch.equal(out[1], ref[1])  # the residual sum is one rounding of x + residual either way


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 2048), (67, 4096), (5, 896)])
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add-norm"])
def test_rmsnorm_matches_module(shape, dtype, with_residual):
    check_rmsnorm(shape, dtype, with_residual, strided=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rmsnorm_per_head_on_a_strided_view(dtype):
    check_rmsnorm((9, 16, 128), dtype, with_residual=False, strided=True)
