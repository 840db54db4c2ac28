"""What every attention backend is told about the batch of one step."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """The step's tokens are flattened request by request: request i owns rows
    ``query_start_loc[i]:query_start_loc[i+1]`` of q/k/v, its queries are the last
    tokens of its ``context_lens[i]`` tokens, and its KV lives in ``block_tables[i]``."""

    query_start_loc: list[int]  # [num_requests + 1]
    context_lens: list[int]  # [num_requests]: tokens in the cache after this step
    block_tables: list[list[int]]  # per request, its block ids in order
    slot_block: torch.Tensor  # [num_tokens] long: the block each new token's KV goes to
    slot_offset: torch.Tensor  # [num_tokens] long: its offset inside that block
    block_size: int

    @property
    def num_requests(self) -> int:
        return len(self.context_lens)

    @property
    def is_decode_only(self) -> bool:
        return all(self.query_start_loc[i + 1] - self.query_start_loc[i] == 1 for i in range(self.num_requests))
