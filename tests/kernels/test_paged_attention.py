"""The Triton paged-attention kernels against a float64 reference on fresh random paged caches.

Covers the supported range: head dims 64/128, GQA ratios 1/4/8, block sizes 16/32,
contexts from 1 token to 32k in one batch, fp32 and bf16, with and without context
splits and a sliding window. Block tables are random permutations, the cache is a
strided layer view of the whole-model layout, and outputs are poisoned with NaN first.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NUM_KV_HEADS = 2
NUM_LAYERS = 2  # the test reads layer 1 of a two-layer cache: the view is strided as in the engine
DECODE_CONTEXTS = (1, 15, 16, 17, 100, 1000, 4099, 32768)
# (tokens already cached, new tokens) per request of a prefill batch.
PREFILL_SPECS = ((0, 1), (0, 17), (0, 64), (0, 130), (5, 40), (16, 16), (100, 1), (999, 300), (32000, 70))
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in the output (unwritten or 0/0)"
    return ((out.double() - ref).norm() / ref.norm()).item()


def make_cache(contexts, num_kv_heads, head_dim, block_size, dtype, device, seed):
    """A random layer view [num_blocks, Hkv, 2, block_size, D] and a random block table per request."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    per_request = [-(-c // block_size) for c in contexts]
    num_blocks = sum(per_request) + 5
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, start = [], 0
    for n in per_request:
        tables.append(order[start : start + n])
        start += n
    cache = torch.randn((num_blocks, num_kv_heads, NUM_LAYERS, 2, block_size, head_dim), generator=gen).to(device, dtype)
    return cache[:, :, 1], tables


def gather(kv_layer, table, ctx):
    """[2, ctx, Hkv, D] float64: request's K and V in token order."""
    kv = kv_layer[table].permute(2, 0, 3, 1, 4)  # [2, blocks, block_size, Hkv, D]
    return kv.reshape(2, -1, kv.shape[3], kv.shape[4])[:, :ctx].double()


def reference(q, k, v, q_pos, scale, window):
    """q [n, H, D], k/v [ctx, Hkv, D], q_pos [n] -> [n, H, D] float64."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("nhd,chd->hnc", q.double(), k) * scale
    k_pos = torch.arange(k.shape[0], device=q.device)
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hnc,chd->nhd", s.softmax(-1), v)


def check_decode(head_dim, group, block_size, dtype, num_splits, window, device="cuda", seed=0):
    from splitserve.kernels.paged_decode import paged_decode_attention

    contexts = DECODE_CONTEXTS
    num_heads = NUM_KV_HEADS * group
    kv_layer, tables = make_cache(contexts, NUM_KV_HEADS, head_dim, block_size, dtype, device, seed)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    q = torch.randn((len(contexts), num_heads, head_dim), generator=gen).to(device, dtype)
    width = max(map(len, tables)) + 3
    block_table = torch.zeros((len(contexts), width), dtype=torch.int32)
    for i, t in enumerate(tables):
        block_table[i, : len(t)] = torch.tensor(t)
    context_lens = torch.tensor(contexts, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    paged_decode_attention(
        q, kv_layer, block_table.to(device), context_lens.to(device), scale, window, num_splits, out=out
    )
    for i, ctx in enumerate(contexts):
        k, v = gather(kv_layer, tables[i], ctx)
        ref = reference(q[i : i + 1], k, v, torch.tensor([ctx - 1], device=device), scale, window)
        err = rel_err(out[i : i + 1], ref)
        assert err < TOLERANCE[dtype], (ctx, err)


def check_prefill(head_dim, group, block_size, dtype, window, device="cuda", seed=0, specs=PREFILL_SPECS):
    from splitserve.kernels.attention_metadata import AttentionMetadata, with_device_tensors
    from splitserve.kernels.paged_prefill import paged_prefill_attention

    contexts = [c + n for c, n in specs]
    num_heads = NUM_KV_HEADS * group
    kv_layer, tables = make_cache(contexts, NUM_KV_HEADS, head_dim, block_size, dtype, device, seed)
    qsl = [0]
    for _, n in specs:
        qsl.append(qsl[-1] + n)
    gen = torch.Generator(device="cpu").manual_seed(seed + 2)
    q = torch.randn((qsl[-1], num_heads, head_dim), generator=gen).to(device, dtype)
    empty = torch.empty(0, dtype=torch.long, device=device)
    meta = with_device_tensors(AttentionMetadata(qsl, contexts, tables, empty, empty, block_size), torch.device(device))
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    paged_prefill_attention(q, kv_layer, meta, scale, window, out=out)
    for i, (cached, n) in enumerate(specs):
        k, v = gather(kv_layer, tables[i], cached + n)
        q_pos = torch.arange(cached, cached + n, device=device)
        ref = reference(q[qsl[i] : qsl[i + 1]], k, v, q_pos, scale, window)
        err = rel_err(out[qsl[i] : qsl[i + 1]], ref)
        assert err < TOLERANCE[dtype], ((cached, n), err)


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
SHAPES = pytest.mark.parametrize("head_dim", [64, 128])
GROUPS = pytest.mark.parametrize("group", [1, 4, 8], ids=["mha", "gqa4", "gqa8"])
BLOCK_SIZES = pytest.mark.parametrize("block_size", [16, 32])


@DTYPES
@SHAPES
@GROUPS
@BLOCK_SIZES
@pytest.mark.parametrize("num_splits", [1, 16], ids=["whole", "split16"])
def test_decode_matches_reference(head_dim, group, block_size, dtype, num_splits):
    check_decode(head_dim, group, block_size, dtype, num_splits, window=None)


@DTYPES
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_sliding_window(dtype, num_splits):
    check_decode(128, 4, 16, dtype, num_splits, window=300, seed=3)


@DTYPES
@SHAPES
@GROUPS
@BLOCK_SIZES
def test_prefill_matches_reference(head_dim, group, block_size, dtype):
    check_prefill(head_dim, group, block_size, dtype, window=None)


@DTYPES
def test_prefill_sliding_window(dtype):
    check_prefill(128, 4, 16, dtype, window=50, seed=5)


def test_decode_padding_rows_are_zero():
    """A captured batch's padding rows have an empty context: zeros, not NaN, for any split count."""
    from splitserve.kernels.paged_decode import paged_decode_attention

    kv_layer, tables = make_cache([40], NUM_KV_HEADS, 64, 16, torch.bfloat16, "cuda", 0)
    q = torch.randn((3, 8, 64), device="cuda", dtype=torch.bfloat16)
    table = torch.zeros((3, 4), dtype=torch.int32, device="cuda")
    table[0, :3] = torch.tensor(tables[0])
    for splits in (1, 8):
        out = paged_decode_attention(q, kv_layer, table, torch.tensor([40, 0, 0], dtype=torch.int32, device="cuda"), 0.125, None, splits)
        assert not out.isnan().any() and (out[1:] == 0).all()
