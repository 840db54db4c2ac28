"""A worker's registration outlives a few seconds of CPU starvation and its load stays fresh.

On a loaded 2-core machine a decode worker's event loop was held off long enough that a 3-second
registration lapsed, and the router refused requests with "no decode worker is available" while
every worker was alive. Real redis-server.
"""
from __future__ import annotations

import asyncio
import time

from splitserve.controlplane import RedisControlPlane, WorkerAgent, WorkerInfo, WorkerLoad
from splitserve.controlplane.testing import run_async


@run_async
async def test_a_worker_starved_for_four_seconds_stays_registered_and_its_load_fresh(redis_server):
    worker_cp = await RedisControlPlane.connect(redis_server.url)
    router_cp = await RedisControlPlane.connect(redis_server.url)
    running = 0
    agent = WorkerAgent(worker_cp, WorkerInfo("starved", "decode", "127.0.0.1:7001", 16), lambda: WorkerLoad(num_running=running), lambda: [])
    try:
        await agent.start()
        time.sleep(4.0)  # the worker's event loop gets no CPU: no heartbeat can go out
        assert [w.info.worker_id for w in await router_cp.live_workers("decode")] == ["starved"]
        running = 7  # heartbeats carry the load every second, whatever the TTL
        deadline = time.monotonic() + 2.5
        while (await router_cp.live_workers("decode"))[0].load.num_running != 7:
            assert time.monotonic() < deadline, "the load was not refreshed within a heartbeat interval"
            await asyncio.sleep(0.05)
    finally:
        await agent.stop()
        await worker_cp.close()
        await router_cp.close()
