"""The Llama family (Llama, Qwen2, Qwen3, Mistral) over a paged KV cache.

One model covers the four: Qwen2 adds q/k/v biases, Qwen3 adds per-head q/k
RMSNorm and an explicit head_dim, Mistral a sliding window. Tokens of all
requests in a step are flattened into one [num_tokens] batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.kernels.attention_metadata import AttentionMetadata
from splitserve.kernels.backend import AttentionBackend
from splitserve.models.arch import ArchConfig
from splitserve.models.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RowParallelLinear,
    TPGroup,
    VocabParallelEmbedding,
)
from splitserve.models.rope import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, layer_idx: int, tp: TPGroup, rope: RotaryEmbedding) -> None:
        super().__init__()
        d = cfg.head_dim
        self.head_dim = d
        self.num_heads = cfg.num_heads // tp.size
        self.num_kv_heads = max(1, cfg.num_kv_heads // tp.size)
        self.sliding_window = cfg.sliding_windows[layer_idx]
        self.scale = d**-0.5
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size,
            {"q": cfg.num_heads * d, "k": cfg.num_kv_heads * d, "v": cfg.num_kv_heads * d},
            bias=cfg.attention_bias,
            tp=tp,
            unit=d,
        )
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, bias=False, tp=tp)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rope = rope
        self.use_rotary_kernel = False  # rotate q and k in place with kernels/rotary.py; set for CUDA runs
        self.kv_scale: torch.Tensor | None = None  # [2] fp32 (K, V) when the KV cache is fp8 (engine/kv_scales.py)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, backend: AttentionBackend
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rotary_kernel and q.is_cuda:
            from splitserve.kernels.rotary import apply_rotary_

            q, k = apply_rotary_(positions, q, k, self.rope.cos, self.rope.sin)
        else:
            q, k = self.rope(positions, q, k)
        out = backend.forward(q, k, v, kv_layer, meta, self.scale, self.sliding_window, kv_scale=self.kv_scale)
        return self.o_proj(out.reshape(-1, q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig, tp: TPGroup) -> None:
        super().__init__()
        i = cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, {"gate": i, "up": i}, bias=cfg.mlp_bias, tp=tp)
        self.down_proj = RowParallelLinear(i, cfg.hidden_size, bias=cfg.mlp_bias, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, layer_idx: int, tp: TPGroup, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, tp, rope)
        self.mlp = MLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, positions, kv_layer, meta, backend) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it); the next norm adds them,
        so the add and the norm can be one kernel. Sums equal ``x + attn(...)``, ``x + mlp(...)`` exactly."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, kv_layer, meta, backend)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ArchConfig, tp: TPGroup = TPGroup(), max_positions: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        rope = RotaryEmbedding(cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp, rope) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        self.rope = rope

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, num_layers, 2, block_size, head_dim]
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, kv_cache[:, :, i], meta, backend)
        return self.norm(x, residual)[0]

    def use_gpu_kernels(self, enabled: bool = True) -> None:
        """Fused RMSNorm(+residual), in-place rotary and fp8 activation quantization through Triton on CUDA tensors (kernels/)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, ColumnParallelLinear, RowParallelLinear)):
                module.use_kernel = enabled
            elif isinstance(module, Attention):
                module.use_rotary_kernel = enabled

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    def checkpoint_targets(self) -> dict[str, list[tuple[nn.Module, str, bool]]]:
        """Checkpoint tensor name -> the layers that load it: (layer, shard name, is it a bias)."""
        targets: dict[str, list[tuple[nn.Module, str, bool]]] = {}

        def add(name: str, module: nn.Module, shard: str = "", is_bias: bool = False) -> None:
            targets.setdefault(name, []).append((module, shard, is_bias))

        add("model.embed_tokens.weight", self.embed_tokens)
        add("model.norm.weight", self.norm)
        add("model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight", self.lm_head)
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            for name in ("q", "k", "v"):
                add(f"{p}self_attn.{name}_proj.weight", attn.qkv_proj, name)
                add(f"{p}self_attn.{name}_proj.bias", attn.qkv_proj, name, True)
            add(f"{p}self_attn.o_proj.weight", attn.o_proj)
            for name in ("gate", "up"):
                add(f"{p}mlp.{name}_proj.weight", mlp.gate_up_proj, name)
                add(f"{p}mlp.{name}_proj.bias", mlp.gate_up_proj, name, True)
            add(f"{p}mlp.down_proj.weight", mlp.down_proj)
            add(f"{p}mlp.down_proj.bias", mlp.down_proj, "", True)
            add(f"{p}input_layernorm.weight", layer.input_layernorm)
            add(f"{p}post_attention_layernorm.weight", layer.post_attention_layernorm)
            if attn.q_norm is not None:
                add(f"{p}self_attn.q_norm.weight", attn.q_norm)
                add(f"{p}self_attn.k_norm.weight", attn.k_norm)
        return targets
