"""On GPUs a TP group whose ranks captured decode CUDA graphs still shuts down: the graphs
hold NCCL communicators, and destroying the process group waits for them (NCCL >= 2.26)
unless they are released first. Needs two GPUs; skipped, visibly, elsewhere."""
from __future__ import annotations

import threading

import pytest
import torch

from splitserve.config import CacheConfig, ModelConfig, ParallelConfig
from splitserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from splitserve.parallel import TPModelRunner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]


def test_a_tp_group_that_replayed_decode_graphs_closes(llama_tiny_dir):
    runner = TPModelRunner(ModelConfig(llama_tiny_dir, dtype=torch.float32, device="cuda"), CacheConfig(block_size=16, num_blocks=16), ParallelConfig(2))
    prefill = SchedulerOutput([ScheduledRequest("r", list(range(3, 20)), 0, [0, 1], True)])
    runner.execute(prefill)
    decode = SchedulerOutput([ScheduledRequest("r", [20], 17, [0, 1], True)])
    assert runner.local.graphs is not None and runner.local.graphs.can_run(decode)
    runner.execute(decode)  # captured and replayed, on both ranks
    closing = threading.Thread(target=runner.close, daemon=True)
    closing.start()
    closing.join(timeout=60)
    assert not closing.is_alive(), "closing the TP group hung"
    assert all(handle.process.wait(timeout=10) == 0 for handle in runner.ranks)
