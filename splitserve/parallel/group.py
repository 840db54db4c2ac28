"""A worker's tensor-parallel group: its settings, its torch.distributed setup, its failure.

One process per rank, all on one host. Rank 0 is the worker's engine process and hosts the
rendezvous store on a free loopback port; collectives run over NCCL on GPUs and gloo on CPUs.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from splitserve.config import CacheConfig, ConfigError, ModelConfig
from splitserve.models.layers import TPGroup

log = logging.getLogger(__name__)


class RankFailedError(RuntimeError):
    """A rank of the TP group died, hung past its deadline or raised: the group is gone.

    Collectives with a dead peer never return, so the whole group is torn down and the
    worker with it; requests in flight fail as UNAVAILABLE (another worker may serve them).
    """


@dataclass(frozen=True)
class TPOptions:
    """How a worker runs its ranks (the TP size itself is ParallelConfig.tensor_parallel_size)."""

    backend: str = "auto"  # "nccl" | "gloo" | "auto": nccl on CUDA, gloo on CPU
    # How long a rank may lag rank 0 in a step (and any collective may wait) before the
    # group is declared dead. Generous: a first step may compile kernels.
    step_timeout_seconds: float = 120.0
    startup_timeout_seconds: float = 600.0  # loading the weights of the largest shard
    host: str = "127.0.0.1"  # the rendezvous store; all ranks of a worker share one host
    # The ranks of one worker talk over loopback: NCCL's bootstrap must not pick another
    # interface (some hosts have none it can use). Set only in the rank processes' (and
    # rank 0's) environment when the backend is NCCL; None leaves NCCL to choose.
    nccl_socket_ifname: str | None = "lo"
    # CPU only: torch intra-op threads of each rank, rank 0 included. None: the host's cores
    # split evenly. Ranks that oversubscribe the cores spin against each other in every
    # collective (measured on 2 cores, TP=2: 54 ms a tiny decode step with 2 threads each, 13 with 1).
    rank_threads: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"backend must be 'auto', 'nccl' or 'gloo', got {self.backend!r}")
        if self.step_timeout_seconds <= 0 or self.startup_timeout_seconds <= 0:
            raise ConfigError("step_timeout_seconds and startup_timeout_seconds must be positive")

    def backend_for(self, device: torch.device) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if device.type == "cuda" else "gloo"

    def threads_per_rank(self, world_size: int) -> int:
        return self.rank_threads or max(1, (os.cpu_count() or 1) // world_size)

    def env_for(self, backend: str) -> dict[str, str]:
        """Environment a rank sets before its process group starts."""
        if backend == "nccl" and self.nccl_socket_ifname is not None:
            return {"NCCL_SOCKET_IFNAME": self.nccl_socket_ifname}
        return {}


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank process needs to join the group and load its shard."""

    rank: int
    world_size: int
    store_port: int
    model: ModelConfig  # with this rank's device
    cache: CacheConfig
    options: TPOptions
    backend: str
    agent_name: str | None = None  # create a NIXL agent over this rank's KV cache
    agent_model: str = ""  # the model name its KVLayout carries
    env: dict[str, str] = field(default_factory=dict)  # set in the rank's process before the group starts
    log_level: str = "WARNING"

    def to_message(self) -> dict:
        from splitserve.parallel.protocol import encode_config

        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**fields, "model": encode_config(self.model), "cache": encode_config(self.cache), "options": encode_config(self.options)}

    @classmethod
    def from_message(cls, msg: dict) -> RankSpec:
        fields = {f.name: msg[f.name] for f in dataclasses.fields(cls)}
        fields.update(model=ModelConfig(**msg["model"]), cache=CacheConfig(**msg["cache"]), options=TPOptions(**msg["options"]))
        return cls(**fields)


def rank_model_config(model: ModelConfig, rank: int) -> ModelConfig:
    """Rank r of a worker on ``cuda:k`` runs on ``cuda:k+r``; on the CPU every rank shares it."""
    device = torch.device(model.device)
    if device.type != "cuda":
        return model
    return dataclasses.replace(model, device=f"cuda:{(device.index or 0) + rank}")


def init_group(spec: RankSpec, store: dist.Store | None = None) -> TPGroup:
    """Joins the worker's process group (rank 0 passes the store it hosts). The other ranks
    were started with ``spec.env``; rank 0, the worker process itself, takes it on here."""
    os.environ.update(spec.env)
    device = torch.device(spec.model.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(spec.options.threads_per_rank(spec.world_size))
    if store is None:
        store = dist.TCPStore(
            spec.options.host, spec.store_port, spec.world_size, is_master=False,
            timeout=timedelta(seconds=spec.options.startup_timeout_seconds),
        )
    # Joining waits for every rank to import torch and start: bounded by the startup timeout,
    # not the step timeout (a loaded host takes seconds). The group is named after its ranks,
    # not after torch's per-process group counter: a join that fails has already moved that
    # counter on, and every later group of this process would then wait on keys its ranks
    # (fresh processes, counting from 0) never write.
    dist.init_process_group(
        spec.backend, store=store, rank=spec.rank, world_size=spec.world_size,
        timeout=timedelta(seconds=spec.options.startup_timeout_seconds),
        device_id=device if device.type == "cuda" else None,
        _ranks=list(range(spec.world_size)),
    )
    # From here on a collective that waits past the step timeout means a dead or hung rank.
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=spec.options.step_timeout_seconds))
    return TPGroup(rank=spec.rank, size=spec.world_size, group=dist.group.WORLD)


def abort_group() -> None:
    """Makes collectives stuck on a dead peer return with an error, where the backend can
    (NCCL); gloo's fail by themselves once the peer's sockets close or its timeout passes."""
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is not None and dist.get_backend() == "nccl":
        abort()


def destroy_group(timeout: float = 30.0) -> None:
    """Destroys the process group, giving up after ``timeout`` seconds (a teardown stuck on a
    peer must not keep the process from exiting). Release CUDA graphs first (ModelRunner.release_graphs)."""
    if not dist.is_initialized():
        return
    done = threading.Thread(target=dist.destroy_process_group, name="tp-destroy-group", daemon=True)
    done.start()
    done.join(timeout)
    if done.is_alive():
        log.warning("destroying the process group did not finish in %.0f s; leaving it", timeout)
