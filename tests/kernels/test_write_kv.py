"""The KV write kernel puts each token's K and V exactly where the reference does, and nothing elsewhere."""
from __future__ import annotations

import pytest
import torch

from splitserve.kernels.attention_metadata import AttentionMetadata
from splitserve.kernels.torch_attention import write_kv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def check_write_kv(num_kv_heads, head_dim, block_size, dtype, device="cuda", seed=0):
    from splitserve.kernels.write_kv import write_kv_cache

    gen = torch.Generator(device="cpu").manual_seed(seed)
    num_blocks, num_tokens = 9, 37
    # A strided layer view of a three-layer cache, poisoned: untouched slots must keep the poison.
    cache = torch.full((num_blocks, num_kv_heads, 3, 2, block_size, head_dim), float("nan"), dtype=dtype, device=device)
    kv_layer = cache[:, :, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slot_block, slot_offset = (slots // block_size).to(device), (slots % block_size).to(device)
    # k and v as views into one fused qkv row, as the model hands them over.
    qkv = torch.randn((num_tokens, 3 * num_kv_heads * head_dim), generator=gen).to(device, dtype)
    k = qkv[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, 2 * num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    expected = cache.clone()
    meta = AttentionMetadata([0, num_tokens], [num_tokens], [[]], slot_block, slot_offset, block_size)
    write_kv(expected[:, :, 2], k, v, meta)
    # Padding rows (negative block) are written nowhere.
    pad_block = torch.cat([slot_block, torch.full((3,), -1, device=device)])
    pad_offset = torch.cat([slot_offset, torch.zeros(3, dtype=torch.long, device=device)])
    k_pad = torch.cat([k, torch.randn_like(k[:3])])
    v_pad = torch.cat([v, torch.randn_like(v[:3])])
    write_kv_cache(k_pad, v_pad, kv_layer, pad_block, pad_offset)
    assert torch.equal(cache.isnan(), expected.isnan())
    assert torch.equal(cache.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (8, 128), (2, 16), (3, 32)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_write_kv_matches_reference(num_kv_heads, head_dim, block_size, dtype):
    check_write_kv(num_kv_heads, head_dim, block_size, dtype)
