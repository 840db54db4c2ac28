"""Moving KV between a TP=2 group and a TP=1 worker with real NIXL agents, both ways.

The TP=2 group is this process (rank 0) plus one rank process (gloo); the TP=1 side is a
ModelRunner in this process with an agent of its own. Both compute the same prompt; the KV
each reads from the other must equal what it computed itself, and a decode step over the
moved KV must give the logits of a decode step over the local one.
"""
from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from splitserve.config import CacheConfig, ModelConfig, ParallelConfig
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from splitserve.kvtransfer import KVLayout, KVTransferAgent
from splitserve.parallel import KVAgentSpec, KVGroup, PeerWorker, RankAgent, TPModelRunner

BLOCK_SIZE = 4
PROMPT = list(range(7, 7 + 37))  # 9 full blocks and a partial one
NUM_PROMPT_BLOCKS = 10
_names = itertools.count()


def prefill(runner, blocks: list[int]) -> torch.Tensor:
    return runner.execute(SchedulerOutput([ScheduledRequest("r", PROMPT, 0, blocks, True)]))


def decode_step(runner, blocks: list[int], token: int) -> torch.Tensor:
    return runner.execute(SchedulerOutput([ScheduledRequest("r", [token], len(PROMPT), blocks, True)]))


def kv_group(runner, name: str) -> KVGroup:
    tp_size = getattr(runner, "tp_size", 1)
    layout = KVLayout.from_kv_cache(runner.kv_cache, model="tiny", tp_size=tp_size, total_num_kv_heads=runner.arch.num_kv_heads)
    agent = KVTransferAgent(name, runner.kv_cache, layout)
    infos = getattr(runner, "infos", [])
    return KVGroup(agent, getattr(runner, "ranks", []), [RankAgent(i.rank, i.agent_name, i.agent_metadata) for i in infos])


def as_peer(group: KVGroup, worker_id: str) -> PeerWorker:
    return PeerWorker(worker_id, group.layout, tuple(group.agents()))


@pytest.fixture(scope="module")
def sides(llama_tiny_dir):
    model = ModelConfig(llama_tiny_dir, dtype=torch.float32)
    cache = CacheConfig(block_size=BLOCK_SIZE, num_blocks=64)
    n = next(_names)
    tp1 = ModelRunner(model, cache)
    tp2 = TPModelRunner(model, cache, ParallelConfig(2), kv_agents=KVAgentSpec(f"tp2-{n}", "tiny"))
    g1, g2 = kv_group(tp1, f"tp1-{n}"), kv_group(tp2, f"tp2-{n}")
    yield tp1, tp2, g1, g2
    g1.close()
    g2.close()
    tp2.close()


def test_tp1_reads_each_half_of_its_heads_from_a_tp2_group(sides):
    tp1, tp2, g1, g2 = sides
    computed_here, computed_there, moved = list(range(0, 10)), list(range(20, 30)), list(range(40, 50))
    logits = prefill(tp1, computed_here)
    prefill(tp2, computed_there)

    async def read():
        await g1.add_peer(as_peer(g2, "tp2"), timeout=10)
        return await g1.read(g2.agent.name, computed_there, moved, notify=b"r", timeout=10)

    result = asyncio.run(read())
    assert not result.notified  # two READs (one per prefill rank): the caller releases the blocks
    assert result.num_bytes == NUM_PROMPT_BLOCKS * tp1.block_bytes
    kv = tp1.kv_cache
    torch.testing.assert_close(kv[moved], kv[computed_here], rtol=1e-5, atol=1e-5)
    # Decoding over the moved KV is decoding over the KV computed here.
    token = int(logits.argmax())
    torch.testing.assert_close(decode_step(tp1, moved + [50], token), decode_step(tp1, computed_here + [10], token), rtol=1e-5, atol=1e-5)


def test_each_rank_of_a_tp2_group_reads_its_heads_from_a_tp1_worker(sides):
    tp1, tp2, g1, g2 = sides
    computed_here, moved = list(range(0, 10)), list(range(30, 40))
    logits = prefill(tp1, computed_here)

    async def read():
        await g2.add_peer(as_peer(g1, "tp1"), timeout=10)
        return await g2.read(g1.agent.name, computed_here, moved, notify=b"r", timeout=10)

    asyncio.run(read())
    heads = tp2.kv_cache.shape[1]  # rank 0's half, copied byte for byte
    assert torch.equal(tp2.kv_cache[moved], tp1.kv_cache[computed_here][:, :heads])
    # Rank 1's half is checked by what it computes with it: the same logits as TP=1.
    token = int(logits.argmax())
    torch.testing.assert_close(decode_step(tp2, moved + [40], token), decode_step(tp1, computed_here + [10], token), rtol=1e-4, atol=1e-4)
