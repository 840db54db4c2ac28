"""Runs the model on one step's batch: builds the flat inputs, owns the KV cache tensor, returns logits."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.config import CacheConfig, ModelConfig
from splitserve.engine.cuda_graphs import DecodeCUDAGraphs
from splitserve.engine.kv_scales import fingerprint
from splitserve.engine.quantized_cache import resolve_kv_cache
from splitserve.engine.scheduler import SchedulerOutput
from splitserve.kernels.attention_metadata import AttentionMetadata, to_device, with_device_tensors
from splitserve.kernels.backend import select_backend
from splitserve.models.fp8 import is_fp8_quantized
from splitserve.models.layers import TPGroup
from splitserve.models.loader import load_model


@dataclass(frozen=True)
class Placeholders:
    """Tokens of a step that are still on the device (async scheduling): the scheduled request
    ``i`` whose ``rows[i] >= 0`` has a placeholder as its last token, and its value is
    ``tokens[rows[i]]``, the previous step's sampled tokens."""

    tokens: torch.Tensor  # [num_sampled_last_step], on the runner's device
    rows: list[int]  # per scheduled request; -1: no placeholder


class ModelRunner:
    """Holds the weights and the paged KV cache of one rank.

    The KV cache is one tensor, block-major with heads outermost: [num_blocks,
    num_kv_heads, num_layers, 2, block_size, head_dim]. Each block is one contiguous
    byte range across all layers, so a whole block moves between workers as a single
    transfer descriptor, and a range of heads inside a block is contiguous too, so
    workers of different TP sizes exchange head slices without a gather.
    """

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, tp: TPGroup = TPGroup()) -> None:
        self.device = torch.device(model_config.device)
        self.tp = tp
        self.bind_thread()
        self.block_size = cache_config.block_size
        arch_max_len = self._peek_max_len(model_config)
        self.max_model_len = model_config.max_model_len or arch_max_len
        self.model, self.arch = load_model(
            model_config.model_dir, model_config.dtype, self.device, tp, max_positions=max(self.max_model_len, arch_max_len),
            quantization=model_config.quantization,
        )
        self.dtype = self.model.embed_tokens.weight.dtype  # the activations' (weights may be fp8)
        self.quantization = "fp8" if is_fp8_quantized(self.model) else "none"
        attn = self.model.layers[0].self_attn
        self.kv_block_shape = (attn.num_kv_heads, self.arch.num_layers, 2, self.block_size, attn.head_dim)
        self.backend = select_backend(self.device)
        self.kv_cache_dtype, self.kv_scales = resolve_kv_cache(self.model, model_config, cache_config, self.backend, self.max_model_len)
        self.kv_scales_id = fingerprint(self.kv_scales)
        self.num_blocks = self._num_blocks(cache_config)
        self.kv_cache = torch.zeros((self.num_blocks, *self.kv_block_shape), dtype=self.kv_cache_dtype, device=self.device)
        self.graphs: DecodeCUDAGraphs | None = None  # decode steps replayed as CUDA graphs
        if self.device.type == "cuda" and self.backend.needs_device_tensors:
            self.model.use_gpu_kernels()
            self.graphs = DecodeCUDAGraphs(self.model, self.kv_cache, self.backend, self.block_size, self.max_model_len)

    def bind_thread(self) -> None:
        """Makes this runner's GPU the calling thread's current device (CUDA keeps one per
        thread): Triton kernels and graph capture launch on the current device, so a worker
        on ``cuda:1`` must say so in every thread that runs the model."""
        if self.device.type == "cuda" and self.device.index is not None:  # plain "cuda": the current one
            torch.cuda.set_device(self.device)

    def release_graphs(self) -> None:
        """Drops the decode graphs (before a TP group is destroyed: see DecodeCUDAGraphs.release)."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    @staticmethod
    def _peek_max_len(model_config: ModelConfig) -> int:
        from splitserve.models.arch import load_arch_config

        return load_arch_config(model_config.model_dir).max_position_embeddings

    @property
    def block_bytes(self) -> int:
        n = 1
        for d in self.kv_block_shape:
            n *= d
        return n * self.kv_cache_dtype.itemsize

    def _num_blocks(self, cache: CacheConfig) -> int:
        if cache.num_blocks is not None:
            return cache.num_blocks
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" and cache.kv_cache_bytes is None else None
        budget = cache.budget_bytes(free)
        num_blocks = budget // self.block_bytes
        if num_blocks < 2:
            raise ValueError(f"a KV budget of {budget} bytes holds {num_blocks} blocks of {self.block_bytes} bytes")
        return num_blocks

    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        input_ids: list[int] = []
        positions: list[int] = []
        query_start_loc = [0]
        context_lens, block_tables, sample_rows = [], [], []
        for s in out.scheduled:
            n = len(s.token_ids)
            input_ids.extend(s.token_ids)
            positions.extend(range(s.start_pos, s.start_pos + n))
            query_start_loc.append(query_start_loc[-1] + n)
            context_lens.append(s.start_pos + n)
            block_tables.append(s.block_ids)
            if s.all_rows:  # every row, the sampled one last (see LLMEngine._prompt_logprobs)
                sample_rows.extend(range(query_start_loc[-2], query_start_loc[-1]))
            elif s.sample:  # the last row, and the rows of the proposed tokens' predecessors before it
                sample_rows.extend(range(query_start_loc[-1] - 1 - s.num_spec, query_start_loc[-1]))
        bs = self.block_size
        slot_block = [s.block_ids[p // bs] for s in out.scheduled for p in range(s.start_pos, s.start_pos + len(s.token_ids))]
        # One pinned copy for the per-token rows (no stream sync: see to_device).
        rows = to_device([input_ids, positions, slot_block, [p % bs for p in positions]], torch.long, self.device)
        meta = AttentionMetadata(
            query_start_loc=query_start_loc,
            context_lens=context_lens,
            block_tables=block_tables,
            slot_block=rows[2],
            slot_offset=rows[3],
            block_size=self.block_size,
        )
        if self.backend.needs_device_tensors:
            meta = with_device_tensors(meta, self.device)
        return rows[0], rows[1], meta, sample_rows

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, placeholders: Placeholders | None = None) -> torch.Tensor:
        """Computes the scheduled tokens' KV; returns logits [num_sampling_rows, vocab]: one row per
        sampling request, 1 + num_spec for a request checking proposed tokens.

        Queued on the device, not waited for: reading the logits is what waits. In a TP group
        rank 0 holds the placeholders' tokens (its engine sampled them) and the other ranks an
        empty buffer of their size: a broadcast on the device fills it, in step order."""
        if placeholders is not None:
            self.tp.broadcast_from_first(placeholders.tokens)
        if self.graphs is not None and self.graphs.can_run(out):
            return self.graphs.run(out, placeholders)
        input_ids, positions, meta, sample_rows = self.prepare(out)
        if placeholders is not None:
            ends = meta.query_start_loc[1:]
            at = [ends[i] - 1 for i, row in enumerate(placeholders.rows) if row >= 0]
            where = to_device([at, [row for row in placeholders.rows if row >= 0]], torch.long, self.device)
            input_ids[where[0]] = placeholders.tokens[where[1]]
        hidden = self.model(input_ids, positions, self.kv_cache, meta, self.backend)
        return self.model.compute_logits(hidden[to_device(sample_rows, torch.long, self.device)])
