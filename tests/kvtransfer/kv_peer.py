"""A KVTransferAgent in its own process, driven over a pipe by the tests.

Commands are small dataclasses, answered with ("ok", value) or ("error", class name,
message). The process may be SIGSTOPped or SIGKILLed at any time; ``PeerProcess.call``
never waits past its timeout.

Peers start from a "forkserver": a clean process that has imported torch and nixl once
and creates no NIXL agent, so each peer is a fork of it (~0.1 s) instead of a fresh
interpreter re-importing torch and nixl (5+ s each on a loaded 2-core machine). The parent's
NIXL/UCX state is never forked.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass

import torch
from splitserve.kvtransfer import KVLayout, KVTransferAgent, LeaseTable

LAYOUT = KVLayout(model="tiny", dtype="float16", block_size=4, num_layers=2,
                  num_kv_heads=2, head_dim=64)  # 4 KiB blocks
NUM_BLOCKS = 64


def kv_pattern(seed: int, num_blocks: int = NUM_BLOCKS) -> torch.Tensor:
    """A cache full of distinct values, the same in every process for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, LAYOUT.num_kv_heads, LAYOUT.num_layers, 2, LAYOUT.block_size,
             LAYOUT.head_dim)
    return torch.randn(shape, generator=gen).to(torch.float16)


@dataclass(frozen=True)
class AddPeer:
    name: str
    metadata: bytes
    layout: KVLayout


@dataclass(frozen=True)
class GetBlocks:
    block_ids: list[int]


@dataclass(frozen=True)
class Grant:
    request_id: str
    block_ids: list[int]
    ttl: float


@dataclass(frozen=True)
class Pump:
    """Polls notifications until ``want`` arrived or ``timeout``; releases the leases they
    name and expires the rest. Answers (notifications, released blocks, num_pinned_blocks)."""

    want: int
    timeout: float


def _serve(name: str, seed: int, conn, device: str = "cpu") -> None:  # runs in the child
    logging.getLogger("nixl").setLevel(logging.WARNING)  # NIXL logs INFO to stdout
    kv = (kv_pattern(seed) if seed else torch.zeros_like(kv_pattern(1))).to(device)
    agent = KVTransferAgent(name, kv, LAYOUT)
    leases = LeaseTable()
    conn.send((agent.metadata(), os.getpid()))
    while True:
        try:
            cmd = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", _handle(cmd, agent, leases, kv)))
        except Exception as exc:  # noqa: BLE001 - reported to the test
            conn.send(("error", type(exc).__name__, str(exc)))


def _handle(cmd: object, agent: KVTransferAgent, leases: LeaseTable, kv: torch.Tensor) -> object:
    if isinstance(cmd, AddPeer):
        return agent.add_peer(cmd.name, cmd.metadata, cmd.layout)
    if isinstance(cmd, GetBlocks):
        return kv[cmd.block_ids].cpu()
    if isinstance(cmd, Grant):
        return leases.grant(cmd.request_id, cmd.block_ids, cmd.ttl).expires_at
    if isinstance(cmd, Pump):
        seen, freed = [], []
        deadline = time.monotonic() + cmd.timeout
        while len(seen) < cmd.want and time.monotonic() < deadline:
            for note in agent.poll_notifications():
                seen.append(note)
                freed += leases.release(note.message.decode()) or []
            time.sleep(0.001)
        for lease in leases.expire():
            freed += lease.block_ids
        return [tuple(n) for n in seen], sorted(freed), leases.num_pinned_blocks
    raise ValueError(f"unknown command {cmd!r}")


class PeerProcess:
    """Handle on a peer process: its agent name, metadata, and signals."""

    def __init__(self, name: str, seed: int, device: str = "cpu") -> None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["kv_peer", "nixl._api"])  # no effect once it runs
        self.name = name
        self.seed = seed
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(name, seed, child, device), daemon=True)
        self.process.start()
        child.close()
        if not self._conn.poll(60):
            raise TimeoutError(f"peer {name} did not start")
        self.metadata, self.pid = self._conn.recv()

    def call(self, cmd: object, timeout: float = 10.0) -> object:
        self._conn.send(cmd)
        if not self._conn.poll(timeout):
            raise TimeoutError(f"peer {self.name} did not answer {cmd!r}")
        reply = self._conn.recv()
        if reply[0] == "error":
            raise RuntimeError(f"peer {self.name}: {reply[1]}: {reply[2]}")
        return reply[1]

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        if self.process.is_alive():
            os.kill(self.pid, signal.SIGKILL)
        self.process.join(10)
        self._conn.close()
