"""The per-row fp8 quantization kernel gives the reference's bytes and scales (models/fp8.quantize_rows)."""
from __future__ import annotations

import pytest
import torch

from splitserve.models.fp8 import quantize_rows

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs a CUDA GPU with fp8"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 64), (3, 176), (64, 4096), (256, 14336), (5, 5000)])
def test_kernel_matches_reference(shape, dtype):
    from splitserve.kernels.quant_fp8 import quantize_rows_fp8

    gen = torch.Generator().manual_seed(sum(shape))
    wide = (torch.randn((shape[0], shape[1] + 32), generator=gen) * 3).to("cuda", dtype)
    x = wide[:, 16 : 16 + shape[1]]  # rows strided, as a view into a fused projection's output is
    x[0].zero_()  # an all-zero row takes the minimum scale, not a division by zero
    q, scale = quantize_rows_fp8(x)
    ref_q, ref_scale = quantize_rows(x)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def test_bad_input_is_refused():
    from splitserve.kernels.quant_fp8 import quantize_rows_fp8

    with pytest.raises(ValueError, match="contiguous"):
        quantize_rows_fp8(torch.randn(8, 8, device="cuda").t())
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        quantize_rows_fp8(torch.zeros(2, 8, device="cuda", dtype=torch.float64))
