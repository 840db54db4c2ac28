"""The control plane: worker registry, load and the KV block index, behind one interface.

    control_plane = await connect("redis://redis:6379/0")   # cluster: shared by every router replica
    control_plane = await connect("embedded")                # router of `splitserve up`: in-process
    control_plane = await connect("grpc://127.0.0.1:50051")  # worker of `splitserve up`: the router's store
"""
from __future__ import annotations

from urllib.parse import urlsplit

from splitserve.controlplane.agent import WorkerAgent
from splitserve.controlplane.interface import ControlPlane
from splitserve.controlplane.memory import MemoryControlPlane
from splitserve.controlplane.redis_store import RedisControlPlane
from splitserve.controlplane.remote import RemoteControlPlane
from splitserve.controlplane.servicer import ControlPlaneServicer
from splitserve.controlplane.types import (
    ControlPlaneError,
    ControlPlaneUnavailable,
    KVEvent,
    KVEventKind,
    LiveWorker,
    Role,
    WorkerInfo,
    WorkerLoad,
)

__all__ = [
    "ControlPlane",
    "ControlPlaneError",
    "ControlPlaneServicer",
    "ControlPlaneUnavailable",
    "KVEvent",
    "KVEventKind",
    "LiveWorker",
    "MemoryControlPlane",
    "RedisControlPlane",
    "RemoteControlPlane",
    "Role",
    "WorkerAgent",
    "WorkerInfo",
    "WorkerLoad",
    "connect",
]

EMBEDDED_URLS = ("embedded", "memory")


async def connect(url: str, *, timeout_seconds: float = 0.5) -> ControlPlane:
    """The store that ``url`` names, checked reachable.

    ``redis://``, ``rediss://``, ``unix://``: RedisControlPlane; ``embedded`` or
    ``memory``: a new in-process MemoryControlPlane; ``grpc://host:port``: the
    embedded store of the router at that address. ``timeout_seconds`` bounds
    connecting and every later call. Raises ControlPlaneUnavailable naming the
    URL when the store cannot be reached, ValueError for a URL of no known kind.
    """
    if url in EMBEDDED_URLS:
        return MemoryControlPlane()
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        return await RedisControlPlane.connect(url, timeout_seconds=timeout_seconds)
    if scheme == "grpc":
        target = urlsplit(url).netloc
        if not target:
            raise ValueError(f"control plane URL {url!r} names no host:port")
        return await RemoteControlPlane.connect(target, timeout_seconds=timeout_seconds)
    raise ValueError(
        f"control plane URL {url!r}: expected redis://, rediss://, unix://, grpc://host:port, or one of {EMBEDDED_URLS}"
    )
