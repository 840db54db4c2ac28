"""KV transfer bandwidth and latency between two processes through splitserve.kvtransfer.

The initiator (this process, the decode side) reads blocks from, or writes blocks to, a
target process (the prefill side) over the path the agent chose for it (CUDA IPC between
GPUs of one host, NIXL/UCX otherwise; --cuda-ipc off forces NIXL), for each number of blocks, block size,
layout and operation, and measures a plain torch copy of the same bytes in the same run as
the ceiling: a host memcpy with --device cpu, a GPU-to-GPU copy with --device cuda (cuda:1
to cuda:0 when there are two GPUs, within cuda:0 otherwise).

Layouts, all moving the same bytes:
  block_major            each block contiguous (all heads, layers, K/V); a run of blocks: 1 descriptor
  block_major_scattered  every other block, so 1 descriptor per block (a fragmented pool)
  layer_major            [layer, K/V, block] planes, 1 descriptor per block per layer per K/V

    python bench/kv_transfer.py --device cpu --out bench/results/kv_transfer_cpu.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
from splitserve.bench.timing import timed
from splitserve.kvtransfer import KVLayout, KVTransferAgent, Span

LAYOUTS = ("block_major", "block_major_scattered", "layer_major")


@dataclass(frozen=True)
class Row:
    layout: str
    op: str
    path: str  # cuda_ipc or nixl (WRITEs always go over NIXL)
    block_size: int
    num_blocks: int
    num_bytes: int
    num_descriptors: int
    latency_p50_ms: float
    latency_p90_ms: float
    gbps: float  # GB/s (1e9 bytes) at the median latency
    ceiling_gbps: float  # plain torch copy of the same bytes, same run
    ratio: float


def _cache(layout: KVLayout, num_blocks: int, device: str) -> torch.Tensor:
    dtype = getattr(torch, layout.dtype)
    shape = (num_blocks, layout.num_kv_heads, layout.num_layers, 2, layout.block_size, layout.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)


def _fill(kv: torch.Tensor) -> None:
    # Block b holds the byte b % 251 + 1 everywhere: enough to see a block land in the wrong place.
    flat = kv.view(kv.shape[0], -1).view(torch.uint8)
    for b in range(kv.shape[0]):
        flat[b].fill_(b % 251 + 1)


def _target(conn, device: str) -> None:
    """The target process: for each layout it is sent, a filled cache behind an agent."""
    agent = None
    while True:
        msg = conn.recv()
        if msg is None:
            break
        layout, num_blocks = msg
        if agent is not None:
            agent.close()
        kv = _cache(layout, num_blocks, device)
        _fill(kv)
        agent = KVTransferAgent(f"target-bs{layout.block_size}", kv, layout)
        conn.send(agent.metadata())
    if agent is not None:
        agent.close()


def _block_ids(layout_name: str, n: int) -> list[int]:
    return list(range(0, 2 * n, 2)) if layout_name == "block_major_scattered" else list(range(n))


def _layer_major_spans(ids: list[int], layout: KVLayout, num_cache_blocks: int) -> list[Span]:
    # The same registered bytes seen as [num_layers * 2, num_cache_blocks, chunk]: one chunk
    # per block per layer per K/V, at the same place on both sides.
    chunk = layout.block_bytes // (layout.num_layers * 2)
    spans = []
    for plane in range(layout.num_layers * 2):
        for b in ids:
            off = (plane * num_cache_blocks + b) * chunk
            spans.append(Span(off, off, chunk))
    return spans





def _ceiling(src: torch.Tensor, dst: torch.Tensor, n: int, args) -> float:
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def copy() -> None:
        dst[:n].copy_(src[:n])
        sync()

    return statistics.median(timed(copy, args.iters, args.warmup))


def run(args) -> list[Row]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    two_gpus = args.device == "cuda" and torch.cuda.device_count() > 1
    local_dev = "cuda:0" if args.device == "cuda" else "cpu"
    remote_dev = "cuda:1" if two_gpus else local_dev
    proc = ctx.Process(target=_target, args=(child, remote_dev), daemon=True)
    proc.start()
    rows: list[Row] = []
    try:
        for block_size in args.block_sizes:
            layout = KVLayout(model="bench", dtype=args.dtype, block_size=block_size,
                              num_layers=args.num_layers, num_kv_heads=args.num_kv_heads,
                              head_dim=args.head_dim)
            num_cache_blocks = 2 * max(args.blocks)
            parent.send((layout, num_cache_blocks))
            peer_metadata = parent.recv()
            kv = _cache(layout, num_cache_blocks, local_dev)
            _fill(kv)
            src = _cache(layout, num_cache_blocks, remote_dev)  # ceiling: a second buffer
            with KVTransferAgent(f"initiator-bs{block_size}", kv, layout, cuda_ipc=args.cuda_ipc == "on") as agent:
                peer = f"target-bs{block_size}"
                agent.add_peer(peer, peer_metadata, layout)
                print(f"# reads from {peer} go over {agent.path(peer)}", flush=True)
                for n in args.blocks:
                    ceiling_s = _ceiling(src, kv, n, args)
                    for layout_name in args.layouts:
                        for op in args.ops:
                            rows.append(_measure(agent, peer, layout, layout_name, op, n,
                                                 num_cache_blocks, ceiling_s, args))
                            print(_format(rows[-1]), flush=True)
                _check_landed(agent, peer, kv, args.timeout)
            del src
    finally:
        parent.send(None)
        proc.join(30)
    return rows


def _measure(agent, peer, layout, layout_name, op, n, num_cache_blocks, ceiling_s, args) -> Row:
    ids = _block_ids(layout_name, n)
    if layout_name == "layer_major":
        spans = _layer_major_spans(ids, layout, num_cache_blocks)

        def go():
            return agent.transfer_spans(op, peer, spans, notify=b"bench", timeout=args.timeout)
    else:
        move = agent.read_blocks if op == "READ" else agent.write_blocks

        def go():
            return move(peer, ids, ids, notify=b"bench", timeout=args.timeout)

    num_descriptors = go().num_descriptors
    times = timed(go, args.iters, args.warmup)
    p50 = statistics.median(times)
    p90 = sorted(times)[int(0.9 * (len(times) - 1))]
    num_bytes = n * layout.block_bytes
    gbps, ceiling = num_bytes / p50 / 1e9, num_bytes / ceiling_s / 1e9
    path = agent.path(peer) if op == "READ" else "nixl"
    return Row(layout_name, op, path, layout.block_size, n, num_bytes, num_descriptors,
               round(p50 * 1e3, 4), round(p90 * 1e3, 4), round(gbps, 3), round(ceiling, 3),
               round(gbps / ceiling, 3))


def _check_landed(agent: KVTransferAgent, peer: str, kv: torch.Tensor, timeout: float) -> None:
    # After WRITEs the target holds our bytes; a READ of blocks 0..3 into 4..7 must bring
    # back block b's fill value (b % 251 + 1) from both sides' identical fill.
    agent.read_blocks(peer, [0, 1, 2, 3], [4, 5, 6, 7], timeout=timeout)
    flat = kv.view(kv.shape[0], -1).view(torch.uint8)
    for src, dst in zip(range(4), range(4, 8)):
        if not bool((flat[dst] == src % 251 + 1).all()):
            raise RuntimeError(f"block {src} did not land in block {dst}")


HEADER = (f"{'layout':<22} {'op':<5} {'path':<8} {'bs':>4} {'blocks':>6} {'MiB':>8} {'descs':>6} "
          f"{'p50 ms':>9} {'p90 ms':>9} {'GB/s':>8} {'copy GB/s':>9} {'ratio':>6}")


def _format(r: Row) -> str:
    return (f"{r.layout:<22} {r.op:<5} {r.path:<8} {r.block_size:>4} {r.num_blocks:>6} "
            f"{r.num_bytes / 2**20:>8.2f} {r.num_descriptors:>6} {r.latency_p50_ms:>9.3f} "
            f"{r.latency_p90_ms:>9.3f} {r.gbps:>8.2f} {r.ceiling_gbps:>9.2f} {r.ratio:>6.2f}")


def _machine(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": mp.cpu_count(), "torch": torch.__version__,
            # The CPU numbers swing with whatever else the machine runs: record how busy it was.
            "load_average_1m": round(os.getloadavg()[0], 2)}
    try:
        from importlib.metadata import version
        info["nixl"] = version("nixl-cu13")
    except Exception:  # noqa: BLE001 - informational only
        info["nixl"] = "unknown"
    if device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--blocks", type=_ints, default=[1, 4, 16, 64], help="blocks per request")
    p.add_argument("--block-sizes", type=_ints, default=[16], help="tokens per block")
    p.add_argument("--layouts", type=lambda s: s.split(","), default=list(LAYOUTS))
    p.add_argument("--ops", type=lambda s: s.split(","), default=["READ", "WRITE"])
    # Defaults: one TP rank of Llama-3-8B (32 layers, 8 KV heads of 128, bf16): 2 MiB blocks of 16.
    p.add_argument("--num-layers", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=float, default=30.0, help="per transfer, seconds")
    p.add_argument("--cuda-ipc", choices=("on", "off"), default="on",
                   help="off: reads between GPUs of this host go over NIXL/UCX too (the path before CUDA IPC)")
    p.add_argument("--out", help="write the rows and the run's details here as JSON")
    args = p.parse_args()
    unknown = set(args.layouts) - set(LAYOUTS)
    if unknown:
        p.error(f"unknown layouts {sorted(unknown)}; choose from {LAYOUTS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU")

    # One intra-op thread: the host memcpy ceiling then runs on one core like UCX's copy, and
    # torch's spinning worker threads do not fight the NIXL progress threads for 2 cores.
    torch.set_num_threads(1)
    print(HEADER)
    machine = _machine(args.device)  # before the run: load average as we found it
    started = time.time()
    rows = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(["python"] + sys.argv), "machine": machine,
                       "args": vars(args), "seconds": round(time.time() - started, 1),
                       "rows": [asdict(r) for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
