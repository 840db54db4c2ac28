"""Chooses the KV cache's dtype and, for fp8, gives every attention layer its K/V scales."""
from __future__ import annotations

import logging

import torch

from splitserve.config import CacheConfig, ConfigError, ModelConfig
from splitserve.engine.kv_scales import checkpoint_kv_scales, measure_kv_scales
from splitserve.kernels.kv_quant import FP8_KV_DTYPE

log = logging.getLogger(__name__)


def resolve_kv_cache(
    model, model_config: ModelConfig, cache_config: CacheConfig, backend, max_model_len: int
) -> tuple[torch.dtype, torch.Tensor | None]:
    """(the cache's dtype, its [num_layers, 2] scales or None). ``auto``: the model's dtype, no scales."""
    dtype = model.embed_tokens.weight.dtype
    if cache_config.kv_cache_dtype == "auto":
        return dtype, None
    device = model.embed_tokens.weight.device
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError("kv_cache_dtype fp8 needs a GPU with fp8 support (compute capability 8.9 or later)")
    scales = checkpoint_kv_scales(model_config.model_dir, model.cfg.num_layers)
    source = "the checkpoint"
    if scales is None:
        scales = measure_kv_scales(model, backend, cache_config.block_size, max_model_len)
        source = "a calibration prompt"
    log.info("fp8 KV cache; K/V scales from %s: K %s, V %s", source, _span(scales[:, 0]), _span(scales[:, 1]))
    for i, layer in enumerate(model.layers):
        layer.self_attn.kv_scale = scales[i].to(device)
    return FP8_KV_DTYPE, scales


def _span(values: torch.Tensor) -> str:
    return f"{values.min().item():.3g}..{values.max().item():.3g}"
