"""What every attention backend is told about the batch of one step."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

# Query rows per program of the paged prefill kernel; the query tiles below are cut to it.
PREFILL_BLOCK_M = 64


@dataclass
class AttentionMetadata:
    """The step's tokens are flattened request by request: request i owns rows
    ``query_start_loc[i]:query_start_loc[i+1]`` of q/k/v, its queries are the last
    tokens of its ``context_lens[i]`` tokens, and its KV lives in ``block_tables[i]``.

    The lists serve the CPU reference. The GPU kernels read the same batch from the
    device tensors below (``with_device_tensors``), which a CUDA graph can capture as
    static buffers.
    """

    query_start_loc: list[int]  # [num_requests + 1]
    context_lens: list[int]  # [num_requests]: tokens in the cache after this step
    block_tables: list[list[int]]  # per request, its block ids in order
    slot_block: torch.Tensor  # [num_tokens] long: the block each new token's KV goes to
    slot_offset: torch.Tensor  # [num_tokens] long: its offset inside that block
    block_size: int
    block_table_tensor: torch.Tensor | None = None  # [num_requests, max_blocks] int32
    context_lens_tensor: torch.Tensor | None = None  # [num_requests] int32
    query_start_loc_tensor: torch.Tensor | None = None  # [num_requests + 1] int32
    # Prefill only: query tile t covers rows tile_start[t] : tile_start[t] + PREFILL_BLOCK_M
    # of request tile_request[t] (rows counted inside that request).
    tile_request: torch.Tensor | None = None  # [num_tiles] int32
    tile_start: torch.Tensor | None = None  # [num_tiles] int32

    @property
    def num_requests(self) -> int:
        return len(self.context_lens)


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values as a tensor on ``device``, without waiting for the device: a plain copy
    from pageable memory makes PyTorch synchronize the stream, which would stall the host
    until the step before is done (async scheduling overlaps exactly that). The pinned
    staging block is not reused before its copy ran (PyTorch's pinned allocator sees to it)."""
    host = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def block_table_array(block_tables: list[list[int]], width: int | None = None) -> np.ndarray:
    """The ragged block tables as one [num_requests, width] int32 array, zero-padded."""
    width = width or max((len(t) for t in block_tables), default=1) or 1
    table = np.zeros((len(block_tables), width), dtype=np.int32)
    for i, ids in enumerate(block_tables):
        table[i, : len(ids)] = ids
    return table


def with_device_tensors(meta: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    """A copy of ``meta`` with the tensors the GPU kernels read, built in one host pass."""
    qsl = meta.query_start_loc
    tile_request: list[int] = []
    tile_start: list[int] = []
    for i in range(meta.num_requests):
        starts = range(0, qsl[i + 1] - qsl[i], PREFILL_BLOCK_M)
        tile_request.extend([i] * len(starts))
        tile_start.extend(starts)

    def dev(values) -> torch.Tensor:
        return to_device(values, torch.int32, device)

    return dataclasses.replace(
        meta,
        block_table_tensor=dev(block_table_array(meta.block_tables)),
        context_lens_tensor=dev(meta.context_lens),
        query_start_loc_tensor=dev(qsl),
        tile_request=dev(tile_request),
        tile_start=dev(tile_start),
    )
