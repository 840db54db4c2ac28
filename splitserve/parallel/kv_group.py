"""A worker's NIXL agents, one per TP rank, used as one: what the services move KV with.

Rank 0's agent lives in this process and is driven on the event loop; the other ranks'
agents live in their rank processes and are driven by ADD_PEER / REMOVE_PEER / LOAD_KV
messages. Each rank holds only its own KV heads, so each rank moves only those: a decode
rank reads, from every prefill rank holding some of its heads, one span per block run and
head slice (``kvtransfer.layout.plan_head_slices``). Equal TP sizes map rank to rank and
move whole blocks; with one rank on each side this is exactly one agent's block read.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from splitserve.kvtransfer import (
    BadMetadataError,
    KVLayout,
    KVTransferAgent,
    KVTransferError,
    PeerDisconnectedError,
    TransferFailedError,
    TransferResult,
    TransferTimeoutError,
    UnknownPeerError,
)
from splitserve.kvtransfer.layout import plan_head_slices
from splitserve.kvtransfer.paths import NIXL
from splitserve.parallel import protocol as p
from splitserve.parallel.group import RankFailedError
from splitserve.parallel.kv_reads import DISCONNECTED, OK, ReadOutcome, SliceRead, read_slices

log = logging.getLogger(__name__)

# How long past the transfer deadline rank 0 waits for another rank's answer before
# calling that rank hung (its own deadline fires first; this only covers a stuck process).
REPLY_GRACE_S = 5.0


@dataclass(frozen=True)
class RankAgent:
    """One rank's agent as peers see it (proto ``RankAgent``)."""

    tp_rank: int
    agent_name: str
    agent_metadata: bytes


@dataclass(frozen=True)
class PeerWorker:
    """Another worker's agents, from its TransferMetadata: ``layout`` is its rank 0's."""

    worker_id: str
    layout: KVLayout
    ranks: tuple[RankAgent, ...]

    @property
    def name(self) -> str:  # the name KV handles carry: rank 0's agent
        return self.ranks[0].agent_name

    def rank_layouts(self) -> list[KVLayout]:
        return [dataclasses.replace(self.layout, tp_rank=r.tp_rank) for r in self.ranks]


@dataclass(frozen=True)
class GroupReadResult:
    num_bytes: int
    notified: bool  # the peer was told by NIXL that the data landed; else release it explicitly


@dataclass(frozen=True)
class _Plan:
    peer: PeerWorker
    reads: tuple[tuple[SliceRead, ...], ...]  # per local rank

    @property
    def num_reads(self) -> int:
        return sum(len(r) for r in self.reads)


class KVGroup:
    """Rank 0's agent plus the other ranks' (through ``ranks``, a TPModelRunner's handles).
    Used from one event loop."""

    def __init__(self, agent: KVTransferAgent, ranks: Sequence = (), rank_agents: Sequence[RankAgent] = ()) -> None:
        self.agent = agent
        self.layout = agent.layout
        self.ranks = list(ranks)  # RankHandle of ranks 1..n-1
        self._rank_agents = [RankAgent(0, agent.name, b""), *rank_agents]
        self._plans: dict[str, _Plan] = {}
        # local block -> rank -> given-up READs of that rank that may still write into it
        self._in_doubt: dict[int, Counter[int]] = {}

    @property
    def tp_size(self) -> int:
        return 1 + len(self.ranks)

    def agents(self) -> list[RankAgent]:
        """Every rank's agent with fresh metadata, rank 0 first (for TransferMetadata)."""
        return [RankAgent(0, self.agent.name, self.agent.metadata()), *self._rank_agents[1:]]

    @property
    def peers(self) -> frozenset[str]:
        return frozenset(self._plans)

    def peer(self, name: str) -> PeerWorker:
        return self._plans[name].peer

    async def add_peer(self, peer: PeerWorker, timeout: float) -> None:
        """Makes every local rank reach the peer ranks holding its heads. Refuses (before any
        agent is touched) a peer whose layout cannot be mapped onto ours."""
        if len(peer.ranks) != peer.layout.tp_size:
            raise BadMetadataError(f"peer {peer.name!r} has tp_size {peer.layout.tp_size} but sent {len(peer.ranks)} rank agents")
        remote = peer.rank_layouts()
        local = [dataclasses.replace(self.layout, tp_rank=r) for r in range(self.tp_size)]
        slices = [plan_head_slices(layout, remote, peer.name) for layout in local]
        reads = tuple(tuple(SliceRead(peer.ranks[s.remote_rank].agent_name, s) for s in rank) for rank in slices)
        for rank, rank_reads in enumerate(reads):
            for remote_rank in sorted({r.heads.remote_rank for r in rank_reads}):
                agent = peer.ranks[remote_rank]
                if rank == 0:
                    self.agent.add_peer(agent.agent_name, agent.agent_metadata, remote[remote_rank])
                else:
                    await self._ask(
                        rank, p.ADD_PEER, timeout, name=agent.agent_name,
                        metadata=p.encode_bytes(agent.agent_metadata), layout=p.encode_layout(remote[remote_rank]),
                    )
        self._plans[peer.name] = _Plan(peer, reads)

    async def probe(self, name: str, timeout: float) -> tuple[TransferResult, str, bool]:
        """Times a read from the peer's rank 0 by ours (the pair every layout has: rank 0
        holds head 0 on both sides); returns it, the path it took and whether that peer is
        known to be on this host."""
        return await self.agent.probe(name, timeout), self.agent.path(name), self.agent.same_host(name)

    async def remove_peer(self, name: str, timeout: float = 10.0) -> None:
        """Forgets a peer worker on every rank (its process is gone or restarted)."""
        plan = self._plans.pop(name, None)
        if plan is None:
            raise UnknownPeerError(f"peer {name!r} is not known")
        for rank, rank_reads in enumerate(plan.reads):
            for agent_name in sorted({r.peer for r in rank_reads}):
                if rank == 0:
                    if agent_name in self.agent.peers:
                        self.agent.remove_peer(agent_name)
                else:
                    try:
                        await self._ask(rank, p.REMOVE_PEER, timeout, name=agent_name)
                    except (KVTransferError, RankFailedError) as e:
                        log.warning("rank %d could not forget %s: %s", rank, agent_name, e)

    async def read(
        self, peer: str, remote_block_ids: Sequence[int], local_block_ids: Sequence[int], *, notify: bytes, timeout: float
    ) -> GroupReadResult:
        """Every rank reads its heads of the blocks; returns when all have, or raises.

        ``notify`` is sent only when a single READ moves everything (then NIXL tells the peer
        the data landed); with several, no one READ's end means the blocks are free, so the
        caller releases them explicitly. Raises TransferTimeoutError (blocks in doubt until
        ``reclaim`` returns them), PeerDisconnectedError or TransferFailedError."""
        plan = self._plans.get(peer)
        if plan is None:
            raise UnknownPeerError(f"peer {peer!r} is not known; add_peer() it first")
        # CUDA IPC copies notify no one: the prefill worker is then told by the caller's release.
        notified = plan.num_reads == 1 and plan.reads[0][0].heads.remote_rank == 0 and self.agent.path(plan.reads[0][0].peer) == NIXL
        note = notify if notified else b""
        followers = [
            self._ask(
                rank, p.LOAD_KV, timeout + REPLY_GRACE_S,
                reads=[{"peer": r.peer, "heads": list(r.heads)} for r in rank_reads],
                remote_block_ids=list(remote_block_ids), local_block_ids=list(local_block_ids),
                notify=p.encode_bytes(note), timeout=timeout,
            )
            for rank, rank_reads in enumerate(plan.reads) if rank > 0 and rank_reads
        ]
        own = read_slices(self.agent, plan.reads[0], remote_block_ids, local_block_ids, notify=note, timeout=timeout)
        results = await asyncio.gather(own, *followers, return_exceptions=True)
        outcomes = [r if isinstance(r, (ReadOutcome, BaseException)) else ReadOutcome.from_message(r) for r in results]
        ranks = [0, *(rank for rank, reads in enumerate(plan.reads) if rank > 0 and reads)]
        self._settle(peer, timeout, outcomes, ranks, local_block_ids)
        return GroupReadResult(sum(o.num_bytes for o in outcomes if isinstance(o, ReadOutcome)), notified)

    def reclaim(self) -> list[int]:
        """Local blocks of given-up reads that every rank is done with (each returned once)."""
        settled = [(0, self.agent.reclaim())]
        for handle in self.ranks:
            while not handle.reclaimed.empty():
                settled.append((handle.rank, handle.reclaimed.get()))
        free = []
        for rank, blocks in settled:
            for block in blocks:
                ranks = self._in_doubt.get(block)
                if ranks is None or not ranks[rank]:
                    continue
                ranks[rank] -= 1
                if not +ranks:
                    del self._in_doubt[block]
                    free.append(block)
        return free

    def close(self) -> None:
        self.agent.close()  # the other ranks close theirs when they shut down

    def _settle(self, peer: str, timeout: float, outcomes: list, ranks: list[int], local_block_ids: Sequence[int]) -> None:
        given_up = Counter({rank: o.num_given_up for rank, o in zip(ranks, outcomes) if isinstance(o, ReadOutcome) and o.num_given_up})
        if given_up:
            for block in local_block_ids:
                self._in_doubt.setdefault(block, Counter()).update(given_up)
            raise TransferTimeoutError(peer, timeout, tuple(local_block_ids))
        broken = [o for o in outcomes if isinstance(o, BaseException)]
        if broken:
            raise broken[0] if isinstance(broken[0], RankFailedError) else TransferFailedError(str(broken[0]))
        if any(o.status == DISCONNECTED for o in outcomes):
            raise PeerDisconnectedError(_first_error(outcomes, DISCONNECTED))
        if any(o.status != OK for o in outcomes):
            raise TransferFailedError(next(o.error for o in outcomes if o.status != OK))

    async def _ask(self, rank: int, kind: str, reply_timeout: float, **fields) -> dict:
        handle = self.ranks[rank - 1]
        future = asyncio.wrap_future(handle.request(kind, **fields))
        try:
            reply = await asyncio.wait_for(future, reply_timeout)
        except TimeoutError:
            # A rank this late (its own deadlines are shorter) is stuck, and so is the group.
            reason = f"rank {rank} did not answer {kind} within {reply_timeout:.1f}s"
            handle.lost(reason)
            raise RankFailedError(reason) from None
        if kind != p.LOAD_KV and reply.get("error"):
            raise _error_from_rank(reply["error"])
        return reply


def _first_error(outcomes: list, status: str) -> str:
    return next(o.error for o in outcomes if isinstance(o, ReadOutcome) and o.status == status)


def _error_from_rank(text: str) -> KVTransferError:
    kind, _, message = text.partition(": ")
    from splitserve.kvtransfer import errors

    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, KVTransferError) and cls not in (errors.IncompatiblePeerError, TransferTimeoutError):
        return cls(message)
    return KVTransferError(text)
