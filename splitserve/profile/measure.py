"""``splitserve profile``: time prefill chunks, decode steps and KV transfers on the device
at hand, through the engine's ``ModelRunner`` and the ``kvtransfer`` agent the workers use.

A step is timed as the async engine runs it: ``iters`` steps queued back to back and one
wait at the end, so the host's work for step N+1 overlaps the device's for step N and the
time per step is the device's (on the CPU, where nothing overlaps, it is simply the step).
Decode steps run through the CUDA graphs the workers replay. KV transfers are READs of
contiguous block runs between two agents on this device (GPU memory on a GPU, host memory
on the CPU), each a whole ``read_blocks`` call as the decode worker makes it.
"""
from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from splitserve.config import CacheConfig, ModelConfig
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from splitserve.profile.schema import ModelShape, Profile


@dataclass(frozen=True)
class ProfileGrid:
    """What to time. Every prefill (tokens, context) and decode (batch, context) pair runs."""

    prefill_tokens: tuple[int, ...]
    prefill_contexts: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    transfer_blocks: tuple[int, ...]
    iters: int = 10
    warmup: int = 2

    def __post_init__(self) -> None:
        for name in ("prefill_tokens", "decode_batches", "decode_contexts", "transfer_blocks"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                raise ValueError(f"{name} must be a non-empty list of positive integers, got {list(values)}")
        if any(c < 0 for c in self.prefill_contexts) or not self.prefill_contexts:
            raise ValueError("prefill_contexts must be a non-empty list of integers >= 0")
        if self.iters < 1 or self.warmup < 0:
            raise ValueError("iters must be >= 1 and warmup >= 0")

    def max_len(self) -> int:
        return max(max(self.prefill_tokens) + max(self.prefill_contexts), max(self.decode_contexts) + 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(runner: ModelRunner, out: SchedulerOutput, iters: int, warmup: int) -> float:
    """Milliseconds per step, steps queued back to back (see the module docstring)."""
    for _ in range(warmup):
        runner.execute(out)
    _sync(runner.device)
    start = time.perf_counter()
    for _ in range(iters):
        logits = runner.execute(out)
    logits.argmax(-1).tolist()  # the last step's result read back, as the engine does
    _sync(runner.device)
    return (time.perf_counter() - start) / iters * 1e3


def _blocks(rng: random.Random, num_blocks: int, counts: Sequence[int]) -> list[list[int]]:
    chosen = rng.sample(range(num_blocks), sum(counts))
    tables, at = [], 0
    for n in counts:
        tables.append(chosen[at : at + n])
        at += n
    return tables


def prefill_step(runner: ModelRunner, tokens: int, context: int, rng: random.Random) -> SchedulerOutput:
    """One request computing ``tokens`` new tokens after ``context`` already in its blocks."""
    (table,) = _blocks(rng, runner.num_blocks, [-(-(context + tokens) // runner.block_size)])
    ids = [rng.randrange(3, 1000) for _ in range(tokens)]
    return SchedulerOutput([ScheduledRequest("p", ids, context, table, True)])


def decode_step(runner: ModelRunner, batch: int, context: int, rng: random.Random) -> SchedulerOutput:
    """``batch`` requests with ``context`` tokens each, the last one computed now."""
    per = -(-context // runner.block_size)
    tables = _blocks(rng, runner.num_blocks, [per] * batch)
    return SchedulerOutput(
        [ScheduledRequest(f"d{i}", [rng.randrange(3, 1000)], context - 1, tables[i], True) for i in range(batch)]
    )


def measure_transfers(runner: ModelRunner, counts: Sequence[int], iters: int, warmup: int) -> list[tuple[int, float]]:
    """(bytes, ms) of READs of ``n`` contiguous blocks between two agents on this device."""
    from splitserve.kvtransfer import KVLayout, KVTransferAgent

    num_blocks = max(counts)
    shape = (num_blocks, *runner.kv_block_shape)
    # Blocks of the cache's own dtype (an fp8 cache moves half of bf16's bytes).
    local = torch.zeros(shape, dtype=runner.kv_cache_dtype, device=runner.device)
    remote = torch.ones(shape, dtype=runner.kv_cache_dtype, device=runner.device)
    layout = KVLayout.from_kv_cache(local, model="profile")
    rows = []
    with KVTransferAgent("profile-decode", local, layout) as reader, KVTransferAgent("profile-prefill", remote, layout) as target:
        reader.add_peer("profile-prefill", target.metadata(), layout)
        for n in counts:
            ids = list(range(n))
            times = []
            for i in range(warmup + iters):
                start = time.perf_counter()
                reader.read_blocks("profile-prefill", ids, ids, timeout=60.0)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            rows.append((n * runner.block_bytes, statistics.median(times) * 1e3))
    return rows


def run_profile(
    model_dir: Path, device: str, dtype: str | None, grid: ProfileGrid, name: str,
    block_size: int = 16, log: Callable[[str], None] = print,
) -> Profile:
    rng = random.Random(0)
    per_decode = max(b * -(-c // block_size) for b in grid.decode_batches for c in grid.decode_contexts)
    num_blocks = max(per_decode, -(-grid.max_len() // block_size)) + 8
    runner = ModelRunner(
        ModelConfig(model_dir, dtype=dtype, device=device, max_model_len=grid.max_len() + block_size),
        CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=False),
    )
    runner.kv_cache.normal_()  # attention reads real-looking numbers
    if runner.graphs is not None:
        runner.graphs.capture(tuple(sorted(set(grid.decode_batches))))
    prefill = []
    for context in grid.prefill_contexts:
        for tokens in grid.prefill_tokens:
            ms = time_steps(runner, prefill_step(runner, tokens, context, rng), grid.iters, grid.warmup)
            prefill.append((tokens, context, ms))
            log(f"prefill tokens={tokens} context={context}: {ms:.3f} ms")
    decode = []
    for context in grid.decode_contexts:
        for batch in grid.decode_batches:
            ms = time_steps(runner, decode_step(runner, batch, context, rng), grid.iters, grid.warmup)
            decode.append((batch, context, ms))
            log(f"decode batch={batch} context={context}: {ms:.3f} ms")
    transfer = measure_transfers(runner, grid.transfer_blocks, grid.iters, grid.warmup)
    for num_bytes, ms in transfer:
        log(f"transfer {num_bytes / 2**20:.2f} MiB: {ms:.3f} ms")
    arch = runner.arch
    num_kv_heads, head_dim = runner.kv_block_shape[0], runner.kv_block_shape[-1]
    shape = ModelShape(
        name=name, num_layers=arch.num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
        dtype=str(runner.dtype).removeprefix("torch."),
        kv_bytes_per_token=runner.block_bytes // block_size,
    )
    device_name = torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda" else "cpu"
    memory = "VRAM" if runner.device.type == "cuda" else "DRAM"
    return Profile.fitted(
        prefill=prefill, decode=decode, transfer=transfer, device=device_name, model=shape, tp_size=1,
        block_size=block_size, transport=f"nixl-ucx {memory}, one agent pair on this device",
    )
