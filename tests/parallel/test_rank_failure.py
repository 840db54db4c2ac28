"""A rank that dies or hangs fails the whole TP group at once; nothing waits forever.

Collectives with a dead peer never return by themselves (NCCL) or only after the process
group's timeout (gloo), so rank 0 notices through the rank's pipe (EOF, ERROR) and the
step deadline, terminates the group and raises RankFailedError.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from splitserve.config import CacheConfig, ModelConfig, ParallelConfig
from splitserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from splitserve.parallel import RankFailedError, TPModelRunner, TPOptions

STEP = SchedulerOutput([ScheduledRequest("r", list(range(3, 20)), 0, list(range(5)), True)])


def start(model_dir, options: TPOptions = TPOptions()) -> tuple[TPModelRunner, list, threading.Event]:
    runner = TPModelRunner(
        ModelConfig(model_dir, dtype=torch.float32), CacheConfig(block_size=4, num_blocks=16), ParallelConfig(2), options
    )
    errors, failed = [], threading.Event()
    runner.on_failure(lambda e: (errors.append(e), failed.set()))
    runner.execute(STEP)  # the group works
    return runner, errors, failed


def test_a_killed_rank_fails_the_group_while_idle(llama_tiny_dir):
    runner, errors, failed = start(llama_tiny_dir)
    try:
        os.kill(runner.ranks[0].process.pid, signal.SIGKILL)
        assert failed.wait(10), "the rank's death went unnoticed"
        assert "rank 1 exited" in str(errors[0]) and len(errors) == 1
        with pytest.raises(RankFailedError):
            runner.execute(STEP)
    finally:
        runner.close()


def test_a_killed_rank_fails_the_step_in_flight(llama_tiny_dir):
    runner, errors, failed = start(llama_tiny_dir)
    steps = []

    def run_steps():
        try:
            while True:
                runner.execute(STEP)
                steps.append(1)
        except RankFailedError as e:
            steps.append(e)

    stepping = threading.Thread(target=run_steps, daemon=True)
    try:
        stepping.start()
        while len(steps) < 3:
            time.sleep(0.01)
        os.kill(runner.ranks[0].process.pid, signal.SIGKILL)
        stepping.join(timeout=30)
        assert not stepping.is_alive(), "a step hung on the dead rank"
        assert isinstance(steps[-1], RankFailedError)
        assert failed.is_set()
    finally:
        runner.close()


def test_a_hung_rank_fails_the_group_at_the_step_deadline(llama_tiny_dir):
    runner, errors, failed = start(llama_tiny_dir, TPOptions(step_timeout_seconds=3.0))
    rank = runner.ranks[0].process
    try:
        os.kill(rank.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(RankFailedError):
            runner.execute(STEP)
        assert time.monotonic() - started < 30
        assert rank.wait(timeout=10) is not None  # the stopped rank was terminated with the group
    finally:
        if rank.poll() is None:
            os.kill(rank.pid, signal.SIGKILL)
        runner.close()
