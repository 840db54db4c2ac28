"""A decode worker's check of KV handles against the registry (services/peers.py), on the real in-process store."""
from __future__ import annotations

import asyncio

from splitserve.controlplane import MemoryControlPlane, WorkerInfo
from splitserve.services.peers import ListedPeers


def test_only_a_listed_prefill_worker_at_its_own_address_is_dialed():
    async def run() -> None:
        store, now = MemoryControlPlane(), [0.0]
        await store.register(WorkerInfo("prefill-a", "prefill", "10.0.0.1:5000", 16), ttl_seconds=60)
        await store.register(WorkerInfo("decode-a", "decode", "10.0.0.2:5000", 16), ttl_seconds=60)
        peers = ListedPeers(store, refresh_seconds=1.0, min_interval_seconds=0.1, clock=lambda: now[0])
        assert await peers.listed("prefill-a", "10.0.0.1:5000")
        assert not await peers.listed("prefill-a", "169.254.169.254:80")  # its id, another address
        assert not await peers.listed("decode-a", "10.0.0.2:5000")  # listed, but not a prefill worker
        assert not await peers.listed("prefill-b", "10.0.0.3:5000")
        await store.register(WorkerInfo("prefill-b", "prefill", "10.0.0.3:5000", 16), ttl_seconds=60)
        assert not await peers.listed("prefill-b", "10.0.0.3:5000")  # read 0 s ago: not read again yet
        now[0] = 0.2
        assert await peers.listed("prefill-b", "10.0.0.3:5000")  # just registered: found on the next read
        await store.deregister("prefill-a")
        now[0] = 1.5
        assert not await peers.listed("prefill-a", "10.0.0.1:5000")  # gone from the registry

    asyncio.run(run())
