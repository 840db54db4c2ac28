"""KV hand-off between prefill and decode pools of different TP sizes, through the services.

Real processes: router, workers and their rank processes (gloo on the CPU), KV moved over
NIXL head slice by head slice. Outputs must be token-exact with transformers, and every
block must come back free on both sides.
"""
from __future__ import annotations

import asyncio

import pytest

from splitserve.client import Client
from splitserve.controlplane import connect
from splitserve.testing.cluster import wait_until

pytestmark = pytest.mark.slow

PROMPTS = [list(range(3, 3 + 70)), list(range(200, 237)), [5, 9, 11]]


def registered_tp_sizes(router_address: str) -> dict[str, int]:
    async def read() -> dict[str, int]:
        async with await connect(f"grpc://{router_address}", timeout_seconds=5.0) as control_plane:
            return {w.info.worker_id: w.info.tp_size for w in await control_plane.live_workers()}

    return asyncio.run(read())


def _all_free(*services) -> bool:
    for service in services:
        s = service.stats()
        if s.num_free_blocks != s.num_total_blocks or s.num_pinned_blocks or s.num_running or s.num_waiting:
            return False
    return True


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2)])
def test_kv_moves_between_pools_of_different_tp_sizes(start_cluster, greedy, prefill_tp, decode_tp):
    cluster = start_cluster(worker_args=["--num-blocks", "96", "--block-size", "16", "--dtype", "float32"])
    prefill, decode = cluster.add_workers(
        ("prefill", f"prefill-tp{prefill_tp}", ["--tp-size", str(prefill_tp)]),
        ("decode", f"decode-tp{decode_tp}", ["--tp-size", str(decode_tp)]),
    )
    # Each pool's TP size is part of its registration.
    assert registered_tp_sizes(cluster.address) == {f"prefill-tp{prefill_tp}": prefill_tp, f"decode-tp{decode_tp}": decode_tp}
    client = Client(cluster.address)
    for prompt in PROMPTS:
        result = client.complete(prompt, max_tokens=6, ignore_eos=True, timeout=120)
        assert result.token_ids == greedy(prompt, 6)
    stats = decode.stats()
    # Every prompt's KV came over NIXL (none was recomputed on the decode side).
    assert stats.num_kv_transfers == len(PROMPTS) and stats.num_local_prefills == 0
    assert wait_until(lambda: _all_free(prefill, decode))
