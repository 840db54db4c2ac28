"""The step protocol between rank 0 (the engine process) and the other ranks of a TP group.

Every message is one JSON object with a ``kind``, sent as one frame over a pipe per rank.
Rank 0 sends:

  START         once, first: the rank's RankSpec (which shard, which device, which agent)
  STEP          the scheduled requests of one engine step (SchedulerOutput's fields)
  ADD_PEER      add a remote worker's agent to this rank's NIXL agent      -> DONE
  REMOVE_PEER   forget one                                                 -> DONE
  LOAD_KV       read head slices of remote blocks into local blocks        -> LOAD_KV_DONE
  SHUTDOWN      leave the loop and exit

and a rank answers with READY once (blocks, agent metadata), STEP_DONE per step, DONE /
LOAD_KV_DONE per request id, RECLAIMED (blocks of given-up reads that settled) and ERROR
(a traceback, then it exits). Nothing is pickled: a rank can only be asked to do these.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import threading
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from splitserve.engine.model_runner import Placeholders
from splitserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from splitserve.kvtransfer import KVLayout

START = "start"
STEP = "step"
ADD_PEER = "add_peer"
REMOVE_PEER = "remove_peer"
LOAD_KV = "load_kv"
SHUTDOWN = "shutdown"

READY = "ready"
STEP_DONE = "step_done"
DONE = "done"
LOAD_KV_DONE = "load_kv_done"
RECLAIMED = "reclaimed"
ERROR = "error"


class Channel:
    """One end of a rank's pipe. ``send`` may be called from several threads (the engine
    thread steps, the event loop transfers); ``recv`` from one reader only."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._send_lock = threading.Lock()

    def send(self, kind: str, **fields) -> None:
        data = json.dumps({"kind": kind, **fields}, separators=(",", ":")).encode()
        with self._send_lock:
            self.conn.send_bytes(data)

    def recv(self) -> dict:
        """Blocks for the next message; EOFError once the other end is gone."""
        return json.loads(self.conn.recv_bytes())

    def poll(self, timeout: float) -> bool:
        return self.conn.poll(timeout)

    def close(self) -> None:
        self.conn.close()


def encode_step(out: SchedulerOutput, placeholders: Placeholders | None = None) -> dict:
    """``placeholders``: the rows go along, the tokens follow on the device (rank 0 broadcasts
    them; the message says how many)."""
    return {
        "scheduled": [[s.request_id, s.token_ids, s.start_pos, s.block_ids, s.sample, s.all_rows, s.num_spec] for s in out.scheduled],
        "preempted_ids": out.preempted_ids,
        "placeholder_rows": placeholders.rows if placeholders is not None else None,
        "num_sampled": len(placeholders.tokens) if placeholders is not None else 0,
    }


def decode_step(msg: dict) -> SchedulerOutput:
    scheduled = [ScheduledRequest(*fields) for fields in msg["scheduled"]]
    return SchedulerOutput(scheduled=scheduled, preempted_ids=msg["preempted_ids"])


def decode_placeholders(msg: dict, device: torch.device) -> Placeholders | None:
    """The step's Placeholders on a rank other than 0: the rows, and a buffer for rank 0's broadcast."""
    if msg.get("placeholder_rows") is None:
        return None
    return Placeholders(torch.empty(msg["num_sampled"], dtype=torch.long, device=device), msg["placeholder_rows"])


def encode_config(config) -> dict:
    """A frozen config dataclass (ModelConfig, CacheConfig, TPOptions) as JSON-safe fields."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        elif isinstance(value, Path):
            value = str(value)
        out[f.name] = value
    return out


def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode_bytes(text: str) -> bytes:
    return base64.b64decode(text)


def encode_layout(layout: KVLayout) -> dict:
    return {
        "model": layout.model,
        "dtype": layout.dtype,
        "block_size": layout.block_size,
        "num_layers": layout.num_layers,
        "num_kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "tp_size": layout.tp_size,
        "tp_rank": layout.tp_rank,
        "total_num_kv_heads": layout.total_num_kv_heads,
        "layout": layout.layout,
    }


def decode_layout(msg: dict) -> KVLayout:
    return KVLayout(**msg)
