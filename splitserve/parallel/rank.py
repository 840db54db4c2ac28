"""A rank process other than 0: joins the group, loads its shard and follows rank 0's messages.

The main thread runs the steps (the model's collectives pair up with rank 0's). KV work
(peers, reads, reclaiming given-up reads) runs on a transfer thread with an event loop of
its own, so a read in flight never delays a step; the NIXL agent is used only there.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import threading
import traceback
from multiprocessing.connection import Connection

from splitserve.engine.model_runner import ModelRunner
from splitserve.kvtransfer import KVLayout, KVTransferAgent, KVTransferError
from splitserve.kvtransfer.descriptors import HeadSlice
from splitserve.parallel import protocol as p
from splitserve.parallel.group import RankSpec, destroy_group, init_group
from splitserve.parallel.kv_reads import SliceRead, read_slices

log = logging.getLogger(__name__)

RECLAIM_INTERVAL_S = 0.5


def main() -> None:
    """``python -m splitserve.parallel.rank FD``: FD is this rank's end of rank 0's socket pair."""
    channel = p.Channel(Connection(int(sys.argv[1])))
    try:
        msg = channel.recv()
    except EOFError:
        return
    if msg["kind"] != p.START:
        raise SystemExit(f"expected {p.START!r} first, got {msg['kind']!r}")
    run_rank(RankSpec.from_message(msg["spec"]), channel)


def run_rank(spec: RankSpec, channel: p.Channel) -> None:
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s %(levelname)s rank{spec.rank} %(name)s: %(message)s")
    runner = None
    try:
        tp = init_group(spec)
        runner = ModelRunner(spec.model, spec.cache, tp)
        agent = None
        if spec.agent_name is not None:
            layout = KVLayout.from_kv_cache(
                runner.kv_cache, model=spec.agent_model, tp_size=spec.world_size, tp_rank=spec.rank,
                total_num_kv_heads=runner.arch.num_kv_heads, kv_scales=runner.kv_scales_id,
            )
            agent = KVTransferAgent(spec.agent_name, runner.kv_cache, layout)
        metadata = p.encode_bytes(agent.metadata()) if agent is not None else None
        channel.send(p.READY, rank=spec.rank, num_blocks=runner.num_blocks, agent_metadata=metadata)
        transfers = TransferThread(channel, agent) if agent is not None else None
        _follow(channel, runner, transfers)
    except EOFError:
        pass  # rank 0 is gone: so is the group
    except BaseException:
        try:
            channel.send(p.ERROR, rank=spec.rank, error=traceback.format_exc())
        except OSError:
            pass
        raise SystemExit(1) from None
    if runner is not None:
        runner.release_graphs()  # or destroying the group waits on them forever (NCCL)
    destroy_group()


def _follow(channel: p.Channel, runner: ModelRunner, transfers: TransferThread | None) -> None:
    while True:
        msg = channel.recv()
        kind = msg["kind"]
        if kind == p.STEP:
            # On CUDA, queued: a fault surfaces at a later step or collective.
            runner.execute(p.decode_step(msg), p.decode_placeholders(msg, runner.device))
            channel.send(p.STEP_DONE)
        elif kind == p.SHUTDOWN:
            if transfers is not None:
                transfers.stop()
            return
        elif transfers is not None and kind in (p.ADD_PEER, p.REMOVE_PEER, p.LOAD_KV):
            transfers.submit(msg)
        else:
            raise ValueError(f"unexpected message {kind!r}")


class TransferThread:
    """Owns the rank's NIXL agent: every agent call happens on this thread's loop."""

    def __init__(self, channel: p.Channel, agent: KVTransferAgent) -> None:
        self.channel = channel
        self.agent = agent
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="kv-transfers", daemon=True)
        self._thread.start()

    def submit(self, msg: dict) -> None:
        asyncio.run_coroutine_threadsafe(self._handle(msg), self.loop)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._reclaimer = self.loop.create_task(self._reclaim())
        self.loop.run_forever()

    async def _close(self) -> None:
        self._reclaimer.cancel()
        self.agent.close()

    async def _handle(self, msg: dict) -> None:
        kind, request_id = msg["kind"], msg["id"]
        if kind == p.LOAD_KV:
            reads = [SliceRead(r["peer"], HeadSlice(*r["heads"])) for r in msg["reads"]]
            outcome = await read_slices(
                self.agent, reads, msg["remote_block_ids"], msg["local_block_ids"],
                notify=p.decode_bytes(msg["notify"]), timeout=msg["timeout"],
            )
            self.channel.send(p.LOAD_KV_DONE, id=request_id, **outcome.to_message())
            return
        try:
            if kind == p.ADD_PEER:
                self.agent.add_peer(msg["name"], p.decode_bytes(msg["metadata"]), p.decode_layout(msg["layout"]))
            elif msg["name"] in self.agent.peers:
                self.agent.remove_peer(msg["name"])
        except (KVTransferError, ValueError) as e:
            self.channel.send(p.DONE, id=request_id, error=f"{type(e).__name__}: {e}")
            return
        self.channel.send(p.DONE, id=request_id, error="")

    async def _reclaim(self) -> None:
        while True:
            blocks = self.agent.reclaim()
            if blocks:
                self.channel.send(p.RECLAIMED, blocks=blocks)
            await asyncio.sleep(RECLAIM_INTERVAL_S)


if __name__ == "__main__":
    main()
