"""The fp8 KV cache: the reference path stores ``x / scale`` in e4m3 and reads it back scaled;
the Triton kernels (GPU tests, skipped without one) write the same bytes and read them the same way."""
from __future__ import annotations

import pytest
import torch

from splitserve.kernels.attention_metadata import AttentionMetadata
from splitserve.kernels.kv_quant import FP8_KV_DTYPE, FP8_MAX, check_kv_scale, dequantize, quantize
from splitserve.kernels.torch_attention import TorchAttention, write_kv

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 2, 32, 4


def _batch(seed: int, contexts=(9, 14), device="cpu"):
    """Two requests prefilled in one step: q/k/v for all their tokens and the metadata."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(contexts)
    q = torch.randn((total, 4 * NUM_KV_HEADS, HEAD_DIM), generator=gen)
    k = torch.randn((total, NUM_KV_HEADS, HEAD_DIM), generator=gen) * 3
    v = torch.randn((total, NUM_KV_HEADS, HEAD_DIM), generator=gen) * 0.05
    qsl, tables, blocks, offsets, next_block = [0], [], [], [], 1
    for n in contexts:
        qsl.append(qsl[-1] + n)
        table = list(range(next_block, next_block + -(-n // BLOCK_SIZE)))
        next_block += len(table)
        tables.append(table)
        blocks += [table[p // BLOCK_SIZE] for p in range(n)]
        offsets += [p % BLOCK_SIZE for p in range(n)]
    meta = AttentionMetadata(qsl, list(contexts), tables, torch.tensor(blocks, device=device), torch.tensor(offsets, device=device), BLOCK_SIZE)
    return q.to(device), k.to(device), v.to(device), meta, next_block


def test_reference_reads_back_what_it_stored_dequantized():
    """Attention over the fp8 cache equals attention over a full-precision cache holding the dequantized values."""
    q, k, v, meta, num_blocks = _batch(0)
    scale = torch.tensor([3 * 4 / FP8_MAX, 0.05 * 4 / FP8_MAX])
    fp8_cache = torch.zeros((num_blocks, NUM_KV_HEADS, 2, BLOCK_SIZE, HEAD_DIM), dtype=FP8_KV_DTYPE)
    out = TorchAttention().forward(q, k, v, fp8_cache, meta, HEAD_DIM**-0.5, None, kv_scale=scale)
    k_dq, v_dq = dequantize(quantize(k, scale[0]), scale[0], k.dtype), dequantize(quantize(v, scale[1]), scale[1], v.dtype)
    plain_cache = torch.zeros((num_blocks, NUM_KV_HEADS, 2, BLOCK_SIZE, HEAD_DIM))
    expected = TorchAttention().forward(q, k_dq, v_dq, plain_cache, meta, HEAD_DIM**-0.5, None)
    assert torch.equal(out, expected)
    # And it is close to attention without fp8 at all: e4m3 keeps 3 mantissa bits.
    exact = TorchAttention().forward(q, k, v, torch.zeros_like(plain_cache), meta, HEAD_DIM**-0.5, None)
    assert 0 < (out - exact).norm() / exact.norm() < 0.05


def test_quantize_saturates_instead_of_overflowing():
    x = torch.tensor([1e6, -1e6, 500.0, 1.0])
    stored = quantize(x, torch.tensor(1.0))
    assert stored.float().tolist() == [FP8_MAX, -FP8_MAX, FP8_MAX, 1.0]  # e4m3fn's NaN never appears


def test_scales_are_required_exactly_for_an_fp8_cache():
    fp8 = torch.zeros((2, 1, 2, 4, 8), dtype=FP8_KV_DTYPE)
    with pytest.raises(ValueError, match="kv_scale"):
        check_kv_scale(fp8, None)
    with pytest.raises(ValueError, match="kv_scale"):
        check_kv_scale(fp8, torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="only for an fp8"):
        check_kv_scale(torch.zeros((2, 1, 2, 4, 8)), torch.ones(2))
    check_kv_scale(fp8, torch.ones(2))


def _gpu_case(seed: int, contexts, dtype):
    q, k, v, meta, num_blocks = _batch(seed, contexts, "cuda")
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = torch.tensor([3 * 4 / FP8_MAX, 0.05 * 4 / FP8_MAX], device="cuda")
    # A strided layer view of a two-layer cache, as the engine hands it to the kernels.
    cache = torch.zeros((num_blocks, NUM_KV_HEADS, 2, 2, BLOCK_SIZE, HEAD_DIM), dtype=FP8_KV_DTYPE, device="cuda")
    return q, k, v, meta, cache[:, :, 1], scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("contexts", [(9, 14), (1, 300)], ids=["short", "long"])
@gpu[0]
@gpu[1]
def test_triton_matches_the_reference_on_an_fp8_cache(dtype, contexts):
    from splitserve.kernels.attention_metadata import with_device_tensors
    from splitserve.kernels.triton_attention import TritonAttention
    from splitserve.kernels.write_kv import write_kv_cache

    q, k, v, meta, kv_layer, scale = _gpu_case(1, contexts, dtype)
    expected_layer = kv_layer.clone()
    write_kv(expected_layer, k, v, meta, scale)
    write_kv_cache(k, v, kv_layer, meta.slot_block, meta.slot_offset, scale)
    # The same rounding (to nearest even, saturating): at most one e4m3 step apart, almost always equal.
    diff = (kv_layer.view(torch.uint8).int() - expected_layer.view(torch.uint8).int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.999
    meta = with_device_tensors(meta, torch.device("cuda"))
    tol = 2e-5 if dtype == torch.float32 else 1.5e-2
    ref = TorchAttention().forward(q.float(), k.float(), v.float(), expected_layer.clone(), meta, HEAD_DIM**-0.5, None, kv_scale=scale)
    prefill = TritonAttention().forward(q, k, v, kv_layer, meta, HEAD_DIM**-0.5, None, kv_scale=scale)
    assert ((prefill.float() - ref).norm() / ref.norm()).item() < tol
    # Decode: each request's last token again, now as a one-query step over the cache.
    last = [e - 1 for e in meta.query_start_loc[1:]]
    dmeta = with_device_tensors(
        AttentionMetadata(list(range(len(last) + 1)), meta.context_lens, meta.block_tables, meta.slot_block[last], meta.slot_offset[last], BLOCK_SIZE),
        torch.device("cuda"),
    )
    decode = TritonAttention().forward(q[last], k[last], v[last], kv_layer, dmeta, HEAD_DIM**-0.5, None, kv_scale=scale)
    assert ((decode.float() - ref[last]).norm() / ref[last].norm()).item() < tol
