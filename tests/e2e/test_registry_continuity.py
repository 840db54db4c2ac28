"""A Redis that restarts empty under load: the router keeps routing to the workers it knew while
they register again, so no request is refused while every worker is alive. Real redis-server,
router and workers."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from splitserve.client import Client
from splitserve.controlplane import RedisControlPlane
from splitserve.controlplane.testing import require_redis_server, start_redis_server
from splitserve.testing.cluster import Cluster, wait_until

pytestmark = [pytest.mark.slow]


async def _live_ids(url: str) -> set[str]:
    store = await RedisControlPlane.connect(url)
    try:
        return {w.info.worker_id for w in await store.live_workers()}
    finally:
        await store.close()


def test_an_empty_redis_after_a_restart_refuses_nothing_while_workers_are_alive(e2e_model_dir, tmp_path):
    require_redis_server()
    redis = start_redis_server(tmp_path / "redis")
    cluster = Cluster(e2e_model_dir, control_plane=redis.url, worker_args=["--num-blocks", "256"])
    try:
        cluster.add_workers(("prefill", "prefill-r"), ("decode", "decode-r"))
        assert wait_until(lambda: asyncio.run(_live_ids(redis.url)) == {"prefill-r", "decode-r"}, timeout=30)
        client = Client(cluster.address)
        client.complete("warm up the routing table", max_tokens=2, timeout=120)
        failures: list[str] = []
        num_served = 0
        stop = threading.Event()

        def load() -> None:
            nonlocal num_served
            while not stop.is_set():
                try:
                    client.complete("a short prompt, again and again", max_tokens=2, ignore_eos=True, timeout=60)
                    num_served += 1
                except grpc.RpcError as e:
                    failures.append(f"{e.code().name}: {e.details()}")

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(2)
        served_before = num_served
        redis.kill()
        redis = start_redis_server(tmp_path / "redis", port=redis.port)  # the same address, empty
        # The workers find themselves unregistered at their next heartbeat and register again.
        assert wait_until(lambda: asyncio.run(_live_ids(redis.url)) == {"prefill-r", "decode-r"}, timeout=30)
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert failures == []
        assert num_served > served_before  # requests kept being served across the restart
        client.close()
    finally:
        cluster.stop()
        redis.stop()
