"""The in-place rotary kernel rotates q and k as the model's RotaryEmbedding does."""
from __future__ import annotations

import pytest
import torch

from splitserve.models.rope import RotaryEmbedding

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def check_rotary(num_heads, num_kv_heads, head_dim, dtype, device="cuda", seed=0):
    from splitserve.kernels.rotary import apply_rotary_

    gen = torch.Generator(device="cpu").manual_seed(seed)
    rope = RotaryEmbedding(head_dim, 40000, 500000.0, LLAMA3).to(device)
    num_tokens = 45
    qkv = torch.randn((num_tokens, (num_heads + 2 * num_kv_heads) * head_dim), generator=gen).to(device, dtype)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, 40000, (num_tokens,), generator=gen).to(device)
    q_ref, k_ref = rope(positions, q, k)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    apply_rotary_(positions, q, k, rope.cos, rope.sin)
    # bf16: measured on an H100, a few elements differ from the eager ops by one rounding step.
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-6
    for out, ref in ((q, q_ref), (k, k_ref)):
        assert not out.isnan().any()
        assert ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item() <= tol
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], v_before)  # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 64), (32, 8, 128), (4, 4, 16), (14, 2, 64)])
def test_rotary_matches_module(num_heads, num_kv_heads, head_dim, dtype):
    check_rotary(num_heads, num_kv_heads, head_dim, dtype)
