"""Tensor-parallel building blocks: each layer holds and loads only its own shard.

Column-parallel layers split their output features across ranks (QKV, gate/up),
row-parallel ones split their input features and all-reduce the partial sums
(O, down). With one rank they are plain linear layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.models.fp8 import fp8_linear


@dataclass(frozen=True)
class TPGroup:
    """This process's place in its tensor-parallel group. ``group`` is a torch.distributed group."""

    rank: int = 0
    size: int = 1
    group: object | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` into every rank's ``x`` (queued on the device: the host does not wait)."""
        if self.size > 1:
            src = torch.distributed.get_global_rank(self.group, 0) if self.group is not None else 0
            torch.distributed.broadcast(x, src=src, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def shard(self, total: int, name: str) -> tuple[int, int]:
        if total % self.size:
            raise ValueError(f"{name}={total} is not divisible by the TP size {self.size}")
        per_rank = total // self.size
        return self.rank * per_rank, per_rank


class RMSNorm(nn.Module):
    """``norm(x)``; given the residual stream too, ``(norm(x + residual), x + residual)``."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.use_kernel = False  # the fused Triton kernel (kernels/rmsnorm.py); set for CUDA runs

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.use_kernel and x.is_cuda and x.stride(-1) == 1:
            from splitserve.kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # In fp32 and in this order, as transformers does, so low-precision results agree.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's rows (output features) split across ranks.

    ``shards`` names the checkpoint tensors stacked into this one layer and each
    one's full output size, e.g. {"q": 4096, "k": 1024, "v": 1024}; a shard whose
    size is smaller than the TP size (few KV heads) is replicated by ``replicas``.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool, tp: TPGroup, unit: int = 1) -> None:
        super().__init__()
        self.tp, self.unit = tp, unit  # unit: rows that must stay together (a head's head_dim)
        self.offsets: dict[str, tuple[int, int, int]] = {}  # name -> (local offset, full start, rows)
        local = 0
        for name, rows in shards.items():
            start, per_rank = self._rank_rows(name, rows)
            self.offsets[name] = (local, start, per_rank)
            local += per_rank
        self.weight = nn.Parameter(torch.empty(local, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(local), requires_grad=False) if bias else None
        self.weight_scale: torch.Tensor | None = None  # [out] fp32 once the weight is fp8 (models/fp8.py)
        self.use_kernel = False  # fp8: quantize activations with kernels/quant_fp8.py; set for CUDA runs

    def _rank_rows(self, name: str, rows: int) -> tuple[int, int]:
        units = rows // self.unit
        if units >= self.tp.size:
            start, per_rank = self.tp.shard(units, name)
        else:  # fewer heads than ranks: each rank keeps a copy of the head it needs
            if self.tp.size % units:
                raise ValueError(f"{name}: {units} heads cannot be replicated over {self.tp.size} ranks")
            start, per_rank = self.tp.rank * units // self.tp.size, 1
        return start * self.unit, per_rank * self.unit

    def load_shard(self, name: str, tensor_slice, is_bias: bool = False) -> None:
        local, start, rows = self.offsets[name]
        target = (self.bias if is_bias else self.weight).data[local : local + rows]
        target.copy_(tensor_slice[start : start + rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale is not None:
            return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.use_kernel)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """``y = x W^T (+ b)`` with W's columns (input features) split; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.start, per_rank = tp.shard(in_features, "in_features")
        self.weight = nn.Parameter(torch.empty(out_features, per_rank), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.weight_scale: torch.Tensor | None = None  # [out] fp32 once the weight is fp8 (models/fp8.py)
        self.use_kernel = False  # as ColumnParallelLinear's

    def load_shard(self, name: str, tensor_slice, is_bias: bool = False) -> None:
        if is_bias:
            self.bias.data.copy_(tensor_slice[:])
            return
        cols = self.weight.shape[1]
        self.weight.data.copy_(tensor_slice[:, self.start : self.start + cols])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight) if self.weight_scale is None else fp8_linear(x, self.weight, self.weight_scale, use_kernel=self.use_kernel)
        y = self.tp.all_reduce(partial)
        return y if self.bias is None else y + self.bias  # added once, after the sum


class VocabParallelEmbedding(nn.Module):
    """The embedding table split by vocabulary rows; ids of other ranks embed to zero, then all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden_size), requires_grad=False)

    def load_shard(self, name: str, tensor_slice, is_bias: bool = False) -> None:
        rows = max(0, min(self.per_rank, self.vocab_size - self.start))
        self.weight.data[:rows].copy_(tensor_slice[self.start : self.start + rows])
        self.weight.data[rows:].zero_()  # padding rows of the last rank

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's slice of the vocabulary, gathered to the full vocabulary."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather_last_dim(F.linear(hidden, self.weight))[..., : self.vocab_size]
