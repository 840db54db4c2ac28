#!/usr/bin/env python3
"""CPU time an idle NIXL agent costs its process: a KVTransferAgent over a small host-memory
cache, no peer, no transfer, measured over a few seconds with ``os.times``. Run it with
SPLITSERVE_NIXL_PROGRESS_DELAY_US=0 for NIXL's own busy-spinning progress thread.

    python bench/nixl_idle_cpu.py --seconds 3
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from splitserve.kvtransfer import KVLayout, KVTransferAgent


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    kv = torch.zeros(16, 2, 2, 2, 16, 64, dtype=torch.float16)  # [blocks, kv heads, layers, K/V, block size, head dim]
    agent = KVTransferAgent("idle", kv, KVLayout.from_kv_cache(kv, model="idle"))
    time.sleep(0.5)  # the backend's threads have started
    before, start = cpu_seconds(), time.monotonic()
    time.sleep(args.seconds)
    used = (cpu_seconds() - before) / (time.monotonic() - start)
    delay = os.environ.get("SPLITSERVE_NIXL_PROGRESS_DELAY_US", "default")
    print(f"idle agent, progress delay {delay} us: {used:.3f} CPU cores")
    agent.close()


if __name__ == "__main__":
    main()
