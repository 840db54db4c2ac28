"""Joining a TP group: bounded by the startup timeout, and a failed join spoils nothing after it.

A worker process may build its group more than once (a test session does, many times). torch
numbers unnamed process groups with a per-process counter that a failed join has already moved
on; the ranks of the next group are fresh processes counting from 0, so rank 0 would wait on
rendezvous keys nobody writes until its startup timeout.
"""
from __future__ import annotations

import pytest
import torch

from splitserve.config import CacheConfig, ModelConfig, ParallelConfig
from splitserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from splitserve.parallel import RankFailedError, TPModelRunner, TPOptions

STEP = SchedulerOutput([ScheduledRequest("r", list(range(3, 20)), 0, list(range(5)), True)])
# Generous: on a loaded 2-core host a rank takes seconds to import torch and load its shard.
STARTUP = 180.0


def make_runner(model_dir, options: TPOptions) -> TPModelRunner:
    return TPModelRunner(
        ModelConfig(model_dir, dtype=torch.float32), CacheConfig(block_size=4, num_blocks=16), ParallelConfig(2), options
    )


def test_groups_after_a_failed_join_still_form(llama_tiny_dir):
    # No rank process starts within 50 ms: this join fails.
    with pytest.raises(RankFailedError, match="joining the process group"):
        make_runner(llama_tiny_dir, TPOptions(startup_timeout_seconds=0.05))
    for attempt in range(2):
        runner = make_runner(llama_tiny_dir, TPOptions(startup_timeout_seconds=STARTUP))
        try:
            logits = runner.execute(STEP)
            assert logits.shape[0] == 1 and torch.isfinite(logits).all(), f"attempt {attempt}"
        finally:
            runner.close()


def test_joining_is_bounded_by_the_startup_timeout_not_the_step_timeout(llama_tiny_dir):
    # A rank process needs far longer than 0.2 s to start; the join must still succeed.
    runner = make_runner(llama_tiny_dir, TPOptions(step_timeout_seconds=0.2, startup_timeout_seconds=STARTUP))
    try:
        assert runner.num_blocks > 0 and not runner.failed
    finally:
        runner.close()
