"""Frozen configuration pieces shared by every service.

Each service builds one config in ``main()`` from these pieces; each piece is
validated when it is built and never mutated afterwards. Values measured at
run time (how many KV blocks fit) are returned by whoever measures them, not
written back here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


QUANTIZATIONS = (None, "none", "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the model dtype; fp8: float8 e4m3 with per-layer K/V scales


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype: {name!r} is not one of {sorted(DTYPES)}") from None


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Where the checkpoint is and how to run it. Architecture details come from config.json."""

    model_dir: Path
    dtype: torch.dtype | None = None  # None: the checkpoint's torch_dtype
    device: str = "cpu"
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    # "fp8": linear layers' weights in float8 e4m3 with per-channel scales (quantized at load, or
    # as an FP8 checkpoint stores them); "none": the model dtype. None: the checkpoint's own
    # (fp8 when its quantization_config says so).
    quantization: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {QUANTIZATIONS[1:]}, got {self.quantization!r}")
        if self.dtype is not None:
            object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)


CPU_KV_CACHE_BYTES = 256 * 1024 * 1024  # a CPU has no free-memory figure worth sizing from


def default_kv_cache_bytes(device: str) -> int | None:
    """The KV budget when none is given, for workers and the offline ``LLM`` alike: a fixed
    256 MiB on the CPU; None on CUDA (``gpu_memory_utilization`` of the memory free after
    the weights, see ``CacheConfig.budget_bytes``)."""
    return None if device.startswith("cuda") else CPU_KV_CACHE_BYTES


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: block size and how much memory it may take."""

    block_size: int = 16
    # Bytes for KV blocks; None on CUDA: gpu_memory_utilization of free memory after weights.
    kv_cache_bytes: int | None = CPU_KV_CACHE_BYTES
    gpu_memory_utilization: float = 0.9
    num_blocks: int | None = None  # overrides the memory budget when set (tests)
    enable_prefix_caching: bool = True
    # Bytes of host memory (pinned on CUDA) for prefix blocks the GPU pool evicts; None: no host tier.
    host_kv_cache_bytes: int | None = None
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        if self.host_kv_cache_bytes is not None:
            _positive("host_kv_cache_bytes", self.host_kv_cache_bytes)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_bytes is not None:
            _positive("kv_cache_bytes", self.kv_cache_bytes)
        if self.num_blocks is not None:
            _positive("num_blocks", self.num_blocks)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")

    def budget_bytes(self, free_device_bytes: int | None) -> int:
        """Bytes the KV blocks may take: ``kv_cache_bytes`` when set, else this share of the
        device memory free once the weights are loaded (None: not a GPU, so no such figure).
        Two workers on one GPU each take their share of what is free when they start, so
        the one started second must be given a share of what the first left."""
        if self.kv_cache_bytes is not None:
            return self.kv_cache_bytes
        if free_device_bytes is None:
            raise ConfigError("kv_cache_bytes must be set on a CPU device")
        return int(free_device_bytes * self.gpu_memory_utilization)


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = 64  # running requests per step
    max_num_batched_tokens: int = 2048  # token budget per step; prompts are chunked under it
    max_waiting: int = 1024  # queue bound; past it new requests are refused
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for
    # Schedule step N+1 while the device runs step N (outputs come one step later). None: on
    # where it pays, on a GPU (TP groups included); True also runs it on the CPU (tests).
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "max_tokens_limit"):
            _positive(name, getattr(self, name))


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _positive("tensor_parallel_size", self.tensor_parallel_size)


@dataclass(frozen=True)
class TransferConfig:
    """How finished KV moves between workers."""

    mode: str = "read"  # "read": decode pulls; "write": prefill pushes
    lease_seconds: float = 30.0  # prefill holds finished blocks this long unless renewed
    transfer_timeout_seconds: float = 10.0  # per transfer; NIXL never times out by itself
    # The handshake times a read from each prefill peer; below this many GB/s the peer is
    # refused (its requests are prefilled here). 0: only logged, and warned about when slow.
    min_peer_gbps: float = 0.0
    # After a failed transfer a peer is backed off this long (then probed), doubling per failed probe.
    peer_backoff_seconds: float = 5.0
    max_peer_backoff_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.mode not in ("read", "write"):
            raise ConfigError(f"transfer mode must be 'read' or 'write', got {self.mode!r}")
        if self.lease_seconds <= 0 or self.transfer_timeout_seconds <= 0:
            raise ConfigError("lease_seconds and transfer_timeout_seconds must be positive")
        if self.min_peer_gbps < 0 or self.peer_backoff_seconds <= 0 or self.max_peer_backoff_seconds <= 0:
            raise ConfigError("min_peer_gbps must be >= 0 and the peer backoffs positive")


SPECULATIVE_METHODS = ("ngram", "draft")
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: who proposes tokens and how many the target checks per step.

    ``method`` None: off. "ngram": prompt lookup, no model. "draft": a smaller checkpoint
    with the same vocabulary (``draft_model``), with a paged KV cache of its own.
    """

    method: str | None = None
    num_speculative_tokens: int = 3
    draft_model: Path | None = None
    ngram_max: int = 4  # the longest suffix n-gram looked up in the context
    ngram_min: int = 1

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in SPECULATIVE_METHODS:
            raise ConfigError(f"speculative: method must be one of {SPECULATIVE_METHODS}, got {self.method!r}")
        if not isinstance(self.num_speculative_tokens, int) or not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], got {self.num_speculative_tokens!r}")
        if self.draft_model is not None:
            object.__setattr__(self, "draft_model", Path(self.draft_model))
        if self.method == "draft" and self.draft_model is None:
            raise ConfigError("speculative: method 'draft' needs a draft model directory (--draft-model)")
        if self.method != "draft" and self.draft_model is not None:
            raise ConfigError("speculative: a draft model is only used with method 'draft'")
        _positive("ngram_min", self.ngram_min)
        if self.ngram_max < self.ngram_min:
            raise ConfigError(f"ngram_max ({self.ngram_max}) must be >= ngram_min ({self.ngram_min})")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    parallel: ParallelConfig = ParallelConfig()
    speculative: SpeculativeConfig = SpeculativeConfig()
