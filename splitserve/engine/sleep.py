"""Sleep mode for one engine: give its device memory back without ending the process.

Level 1 frees the KV cache and moves the weights to host memory (pinned on CUDA), so waking
is a copy back. Level 2 frees the KV cache and drops the weights; waking reloads them from the
checkpoint. Either way the prefix cache (and the host tier under it) is emptied: the KV it
vouched for is gone. The KV cache tensor keeps its identity and shape while its storage is
freed (resized to zero bytes), so everything holding it sees the new memory after ``wake``;
its address changes, so whoever registered it (a NIXL agent) must register it again, and
decode CUDA graphs, which captured the old addresses, are captured afresh.

Runs on the engine's thread with no request in the engine (the service drains or ends them
first); a step while asleep is a bug, not a request to refuse.
"""
from __future__ import annotations

import gc
import logging
import time

import torch

from splitserve.engine.cuda_graphs import DecodeCUDAGraphs
from splitserve.engine.quantized_cache import resolve_kv_cache
from splitserve.engine.warmup import warm_up
from splitserve.models.loader import load_model

log = logging.getLogger(__name__)

LEVELS = (1, 2)


class EngineSleep:
    """Puts ``engine`` (a single-rank one) to sleep and wakes it; ``level`` is 0 while awake."""

    def __init__(self, engine) -> None:
        runner = engine.runner
        if engine.config.parallel.tensor_parallel_size > 1:  # the other ranks' memory is in their own processes
            raise ValueError("sleep mode needs a tensor parallel size of 1")
        if engine.speculative is not None and engine.config.speculative.method == "draft":  # its model and KV are not handled here
            raise ValueError("sleep mode does not cover a draft model yet")
        self.engine = engine
        self.runner = runner
        self.level = 0
        self._kv_bytes = runner.kv_cache.untyped_storage().nbytes()

    def sleep(self, level: int) -> float:
        """Frees the device memory for ``level``; returns the seconds it took."""
        if level not in LEVELS:
            raise ValueError(f"sleep level must be one of {LEVELS}, got {level}")
        if self.level:
            raise RuntimeError(f"already asleep at level {self.level}")
        runner, engine = self.runner, self.engine
        if engine.scheduler.num_unfinished or engine.scheduler.held:
            raise RuntimeError("the engine still has requests: end them before it sleeps")
        start = time.perf_counter()
        while engine.has_unfinished:  # async scheduling: a step of aborted requests still on the device
            engine.step()
        # Blocks kept from reuse for a given-up transfer: the caller has closed the only writer.
        engine.free_quarantined(list(engine.kv_cache_manager.quarantined))
        engine.block_pool.reset_prefix_cache()
        if engine.host_tier is not None:
            engine.host_tier.clear()
        runner.release_graphs()
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        runner.kv_cache.untyped_storage().resize_(0)
        if level == 1:
            if runner.device.type == "cuda":
                for tensor in (*runner.model.parameters(), *runner.model.buffers()):
                    tensor.data = tensor.data.to("cpu").pin_memory()
            # On the CPU the weights are in host memory already: they stay where they are.
        else:
            runner.model = None
        gc.collect()
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()
        self.level = level
        return time.perf_counter() - start

    def wake(self) -> float:
        """Brings the KV cache and the weights back (empty cache, warm kernels); returns the seconds it took."""
        if not self.level:
            raise RuntimeError("not asleep")
        start = time.perf_counter()
        runner = self.runner
        runner.bind_thread()
        runner.kv_cache.untyped_storage().resize_(self._kv_bytes)
        runner.kv_cache.zero_()
        model_config = self.engine.config.model
        if self.level == 1:
            if runner.device.type == "cuda":
                for tensor in (*runner.model.parameters(), *runner.model.buffers()):
                    tensor.data = tensor.data.to(runner.device, non_blocking=True)
        else:
            runner.model, _ = load_model(
                model_config.model_dir, model_config.dtype, runner.device, runner.tp,
                max_positions=max(runner.max_model_len, runner.arch.max_position_embeddings),
                quantization=model_config.quantization,
            )
            # The KV cache's dtype and scales as the runner first resolved them, set on the new model too.
            runner.kv_cache_dtype, runner.kv_scales = resolve_kv_cache(
                runner.model, model_config, self.engine.config.cache, runner.backend, runner.max_model_len
            )
        if runner.device.type == "cuda" and runner.backend.needs_device_tensors:
            runner.model.use_gpu_kernels()
            runner.graphs = DecodeCUDAGraphs(runner.model, runner.kv_cache, runner.backend, runner.block_size, runner.max_model_len)
            warm_up(runner, self.engine.config.scheduler.max_num_seqs)
            torch.cuda.synchronize(runner.device)
        self.level = 0
        return time.perf_counter() - start
