"""Checkpoints stored in FP8 as Hugging Face tools write them, and fp8 KV scales stored in a checkpoint.

The FP8 checkpoints are made here from the tiny random checkpoint: fine-grained block scales
(transformers' ``quant_method: fp8``, ``weight_scale_inv``) and per-channel scales
(llm-compressor's ``compressed-tensors``, ``weight_scale``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8_measure import agreement, log_probs
from splitserve.config import CacheConfig, ModelConfig
from splitserve.engine.model_runner import ModelRunner
from splitserve.models.arch import CheckpointError
from splitserve.models.fp8 import FP8_DTYPE, FP8_MAX, quantize_rows
from splitserve.models.loader import load_model

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = (16, 32)  # smaller than transformers' 128x128 so the tiny weights span several blocks, ragged at the edges


def _copy(src: Path, dst: Path, quantization_config: dict | None, transform) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    save_file(transform(tensors), str(dst / "model.safetensors"))
    if quantization_config is not None:
        config = json.loads((dst / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEAR


def _block_fp8(tensors: dict) -> dict:
    out = {}
    for name, w in tensors.items():
        if not _is_linear(name):
            out[name] = w
            continue
        rows, cols = w.shape
        bn, bk = BLOCK
        padded = torch.zeros(-(-rows // bn) * bn, -(-cols // bk) * bk)
        padded[:rows, :cols] = w.float()
        blocks = padded.view(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
        scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX  # [row blocks, col blocks]
        q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view_as(padded)[:rows, :cols]
        out[name] = q.to(FP8_DTYPE).contiguous()
        out[name + "_scale_inv"] = scale
    return out


def _channel_fp8(tensors: dict) -> dict:
    out = {}
    for name, w in tensors.items():
        if _is_linear(name):
            out[name], out[name + "_scale"] = quantize_rows(w)  # weight_scale [N, 1]
        else:
            out[name] = w
    return out


@pytest.fixture(scope="module")
def llama_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


def test_per_channel_checkpoint_loads_to_the_same_fp8_values(llama_dir, tmp_path):
    fp8_dir = _copy(llama_dir, tmp_path / "fp8-channel", {"quant_method": "compressed-tensors", "format": "float-quantized"}, _channel_fp8)
    stored = load_file(str(fp8_dir / "model.safetensors"))
    stored_q = stored["model.layers.1.self_attn.q_proj.weight"]
    stored_scale = stored["model.layers.1.self_attn.q_proj.weight_scale"].view(-1)
    # In fp32 the dequantized weight is exact, and quantizing it again over the same per-channel
    # amax gives back the checkpoint's own bytes and scales.
    model, _ = load_model(fp8_dir, torch.float32)
    q_proj = model.layers[1].self_attn.qkv_proj
    assert q_proj.weight.dtype == FP8_DTYPE
    rows = stored_q.shape[0]
    assert torch.equal(q_proj.weight[:rows].view(torch.uint8), stored_q.view(torch.uint8))
    assert torch.equal(q_proj.weight_scale[:rows], stored_scale)
    down = model.layers[0].mlp.down_proj
    assert torch.equal(down.weight.view(torch.uint8), stored["model.layers.0.mlp.down_proj.weight"].view(torch.uint8))
    # In bf16 the dequantized weight is rounded to bf16 (8 bits) before it is quantized again:
    # scales move by that rounding at most.
    model, _ = load_model(fp8_dir, torch.bfloat16)
    assert torch.allclose(model.layers[1].self_attn.qkv_proj.weight_scale[:rows], stored_scale, rtol=2**-8, atol=0)


def test_block_scaled_checkpoint_matches_the_weights_it_was_made_from(llama_dir, tmp_path):
    fp8_dir = _copy(llama_dir, tmp_path / "fp8-block", {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)},
                    _block_fp8)
    # --quantization none: the dequantized weights themselves, one e4m3 rounding from the originals.
    plain, _ = load_model(fp8_dir, torch.float32, quantization="none")
    original, _ = load_model(llama_dir, torch.float32)
    w, w0 = plain.layers[0].mlp.gate_up_proj.weight, original.layers[0].mlp.gate_up_proj.weight
    assert w.dtype == torch.float32 and not torch.equal(w, w0)
    assert ((w - w0).abs() <= w0.abs() * 2**-4 + 1e-6).all()  # half an e4m3 step at most (3 mantissa bits)
    # Served as FP8 (the default for an FP8 checkpoint): as close to bf16 as fp8 weights made here.
    reference = log_probs(llama_dir, "bfloat16")
    top1, kl = agreement(reference, log_probs(fp8_dir, "bfloat16"))
    assert 0 < kl < 0.08 and top1 >= 0.7  # fp8-weight thresholds of test_fp8_agreement (a second rounding adds little)


def test_unsupported_quantization_is_refused_by_name(llama_dir, tmp_path):
    bad = _copy(llama_dir, tmp_path / "awq", {"quant_method": "awq", "bits": 4}, lambda t: t)
    with pytest.raises(CheckpointError, match="awq"):
        load_model(bad)


def test_fp8_weight_without_scale_is_refused(llama_dir, tmp_path):
    def drop_one_scale(tensors):
        out = _channel_fp8(tensors)
        del out["model.layers.0.self_attn.o_proj.weight_scale"]
        return out

    bad = _copy(llama_dir, tmp_path / "no-scale", {"quant_method": "compressed-tensors"}, drop_one_scale)
    with pytest.raises(CheckpointError, match="o_proj.weight has no weight_scale"):
        load_model(bad)


def test_kv_scales_come_from_the_checkpoint_when_it_has_them(llama_dir, tmp_path):
    def add_scales(tensors):
        for i in range(2):
            tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.25 * (i + 1))
            tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.0625)
        return tensors

    with_scales = _copy(llama_dir, tmp_path / "kv-scales", None, add_scales)
    runner = ModelRunner(ModelConfig(with_scales, dtype="bfloat16"), CacheConfig(block_size=4, num_blocks=8, kv_cache_dtype="fp8"))
    assert runner.kv_scales.tolist() == [[0.25, 0.0625], [0.5, 0.0625]]
    assert runner.model.layers[1].self_attn.kv_scale.tolist() == [0.5, 0.0625]
    measured = ModelRunner(ModelConfig(llama_dir, dtype="bfloat16"), CacheConfig(block_size=4, num_blocks=8, kv_cache_dtype="fp8"))
    assert measured.kv_scales_id != runner.kv_scales_id  # the handshake tells the two apart


def test_compressed_tensors_kv_scales_are_read_too(llama_dir, tmp_path):
    def add_scales(tensors):
        for i in range(2):
            tensors[f"model.layers.{i}.self_attn.k_proj.output_scale"] = torch.tensor([0.125])
            tensors[f"model.layers.{i}.self_attn.v_proj.output_scale"] = torch.tensor([0.5])
        return tensors

    with_scales = _copy(llama_dir, tmp_path / "kv-output-scales", None, add_scales)
    runner = ModelRunner(ModelConfig(with_scales, dtype="bfloat16"), CacheConfig(block_size=4, num_blocks=8, kv_cache_dtype="fp8"))
    assert runner.kv_scales.tolist() == [[0.125, 0.5], [0.125, 0.5]]


def test_kv_scales_for_some_layers_only_are_refused(llama_dir, tmp_path):
    def add_one(tensors):
        tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(0.25)
        tensors["model.layers.0.self_attn.v_scale"] = torch.tensor(0.25)
        return tensors

    partial = _copy(llama_dir, tmp_path / "kv-partial", None, add_one)
    with pytest.raises(CheckpointError, match="not layer 1"):
        ModelRunner(ModelConfig(partial, dtype="bfloat16"), CacheConfig(block_size=4, num_blocks=8, kv_cache_dtype="fp8"))


def test_measured_kv_scales_are_powers_of_two_that_cover_the_calibration(llama_dir):
    runner = ModelRunner(ModelConfig(llama_dir, dtype="bfloat16"), CacheConfig(block_size=4, num_blocks=8, kv_cache_dtype="fp8"))
    again = ModelRunner(ModelConfig(llama_dir, dtype="float32"), CacheConfig(block_size=16, num_blocks=64, kv_cache_dtype="fp8"))
    assert runner.kv_cache.dtype == again.kv_cache.dtype == FP8_DTYPE
    exponents = torch.log2(runner.kv_scales)
    assert torch.equal(exponents, exponents.round())
    # Another dtype and block size measure the same scales: workers of one model agree.
    assert runner.kv_scales_id == again.kv_scales_id
