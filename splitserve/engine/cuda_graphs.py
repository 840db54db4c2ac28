"""CUDA graphs of the decode step: one graph per bucketed batch size, all over one set of static buffers.

A decode step launches a few hundred small kernels; at small batches launching them from
Python costs more than running them. Captured once per bucket, the whole step (embedding,
layers, logits) replays as one launch. A decode-only batch of B requests runs in the
smallest bucket >= B; rows B.. are padding: an empty context and a negative slot block,
so they read no KV and write none. Prefill and mixed batches run eagerly.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from splitserve.engine.scheduler import SchedulerOutput
from splitserve.kernels.attention_metadata import AttentionMetadata

if TYPE_CHECKING:
    from splitserve.engine.model_runner import Placeholders  # model_runner imports this module

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)
_HEADER_ROWS = 6  # input ids, positions, slot blocks, slot offsets, context lengths, placeholder rows


class DecodeCUDAGraphs:
    """Captures a bucket's graph the first time a batch needs it (or up front, ``capture``) and replays it.

    Static buffers, sized for the largest bucket and shared by every graph: one int32
    block [6, max_batch] of per-request values and a block table [max_batch,
    max_blocks]. Graphs share one memory pool; they never run concurrently.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, num_layers, 2, block_size, head_dim]
        backend,
        block_size: int,
        max_model_len: int,
        max_batch: int = BATCH_BUCKETS[-1],
    ) -> None:
        self.model, self.kv_cache, self.backend, self.block_size = model, kv_cache, backend, block_size
        self.buckets = tuple(b for b in BATCH_BUCKETS if b < max_batch) + (max_batch,)
        n = self.buckets[-1]
        device = kv_cache.device
        self.max_blocks = -(-max_model_len // block_size)
        self._header = torch.zeros((_HEADER_ROWS, n), dtype=torch.int32, device=device)
        self._block_table = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=device)
        # Pinned staging for the host-to-device copies; reused only after the last copy finished.
        self._header_host = torch.zeros((_HEADER_ROWS, n), dtype=torch.int32).pin_memory()
        self._table_host = torch.zeros(n * self.max_blocks, dtype=torch.int32).pin_memory()
        self._copied = torch.cuda.Event()
        self._copied.record()
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._pool = None
        self.num_replays = 0

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def can_run(self, out: SchedulerOutput) -> bool:
        """A decode-only step: every request computes exactly one token and samples after it."""
        return 0 < len(out.scheduled) <= self.buckets[-1] and all(len(s.token_ids) == 1 and s.sample for s in out.scheduled)

    def capture(self, batch_sizes: tuple[int, ...] | None = None) -> None:
        """Captures the buckets for ``batch_sizes`` (default: all), largest first, so smaller ones reuse its pool."""
        buckets = sorted({self.bucket_for(b) for b in (batch_sizes or self.buckets)} - {None}, reverse=True)
        for bucket in buckets:
            if bucket not in self._graphs:
                self._capture(bucket)

    def run(self, out: SchedulerOutput, placeholders: Placeholders | None = None) -> torch.Tensor:
        """Logits [num_requests, vocab] of a decode-only step (``can_run``), from a replayed graph.

        ``placeholders``: input tokens taken from the device, after the header's copy and
        before the replay, in stream order."""
        batch = len(out.scheduled)
        bucket = self.bucket_for(batch)
        if bucket not in self._graphs:
            self._capture(bucket)
        self._fill(out, bucket, placeholders.rows if placeholders is not None else None)
        if placeholders is not None:
            ids, rows = self._header[0, :bucket], self._header[5, :bucket]
            taken = placeholders.tokens[rows.clamp(min=0)].to(torch.int32)  # padding rows read row 0, unused
            ids.copy_(torch.where(rows >= 0, taken, ids))
        self._graphs[bucket].replay()
        self.num_replays += 1
        return self._logits[bucket][:batch].clone()  # the static buffer is rewritten by the next replay

    def replay(self, batch: int) -> None:
        """Replays ``batch``'s bucket on whatever the static buffers hold (benchmarks time the GPU alone this way)."""
        self._graphs[self.bucket_for(batch)].replay()

    def _fill(self, out: SchedulerOutput, bucket: int, placeholder_rows: list[int] | None) -> None:
        bs, batch = self.block_size, len(out.scheduled)
        self._copied.synchronize()  # the previous step's copies have read the staging buffers
        header = self._header_host.numpy()
        positions = [s.start_pos for s in out.scheduled]
        header[0, :batch] = [s.token_ids[0] for s in out.scheduled]
        header[1, :batch] = positions
        header[2, :batch] = [s.block_ids[p // bs] for s, p in zip(out.scheduled, positions)]
        header[3, :batch] = [p % bs for p in positions]
        header[4, :batch] = [p + 1 for p in positions]
        header[5, :batch] = placeholder_rows if placeholder_rows is not None else -1
        header[:, batch:bucket] = 0
        header[2, batch:bucket] = -1  # padding rows write no KV
        header[5, batch:bucket] = -1
        width = max(positions) // bs + 1  # blocks the longest context spans
        table = self._table_host[: bucket * width].numpy().reshape(bucket, width)
        table[batch:] = 0
        for i, (s, p) in enumerate(zip(out.scheduled, positions)):
            n = p // bs + 1
            table[i, :n] = s.block_ids[:n]
        self._header.copy_(self._header_host, non_blocking=True)  # whole: 5 KiB, one contiguous copy
        self._block_table[:bucket, :width].copy_(self._table_host[: bucket * width].view(bucket, width), non_blocking=True)
        self._copied.record()

    def _forward(self, bucket: int) -> torch.Tensor:
        h = self._header
        meta = AttentionMetadata(
            query_start_loc=list(range(bucket + 1)),
            context_lens=[0] * bucket,  # the lists are not read on this path; the tensors are
            block_tables=[[] for _ in range(bucket)],
            slot_block=h[2, :bucket],
            slot_offset=h[3, :bucket],
            block_size=self.block_size,
            block_table_tensor=self._block_table[:bucket],
            context_lens_tensor=h[4, :bucket],
        )
        hidden = self.model(h[0, :bucket], h[1, :bucket], self.kv_cache, meta, self.backend)
        return self.model.compute_logits(hidden)

    def release(self) -> None:
        """Frees every graph. A graph that captured collectives holds its NCCL communicator:
        destroying the process group waits for such graphs to go (NCCL >= 2.26), forever."""
        for graph in self._graphs.values():
            graph.reset()
        self._graphs.clear()
        self._logits.clear()
        self._pool = None
        torch.cuda.synchronize()

    def _capture(self, bucket: int) -> None:
        # Warm-up and capture run for real: make every row padding so they touch no KV block.
        self._copied.synchronize()
        self._header[:, :bucket] = 0
        self._header[2, :bucket] = -1
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(bucket)  # compiles the Triton kernels, picks cuBLAS algorithms
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._logits[bucket] = self._forward(bucket)
        self._pool = graph.pool()
        self._graphs[bucket] = graph
