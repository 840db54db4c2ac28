"""Where `splitserve up` puts its workers: one GPU, several GPUs of this host, or the CPU.

Each worker sizes its KV cache as a share of the GPU memory free *when it starts*
(``CacheConfig.budget_bytes``). Two workers on one GPU would otherwise each take 90%: the
first all of it, the second what little is left. So on one GPU `up` gives the prefill worker,
started first, its share of the total on purpose, and the decode worker that share of what
the prefill worker left which makes the two add up to the total.
"""
from __future__ import annotations

from dataclasses import dataclass

DISAGGREGATED, COLOCATED = "disaggregated", "colocated"


@dataclass(frozen=True)
class WorkerPlan:
    role: str  # "prefill" | "decode"
    device: str
    args: tuple[str, ...] = ()  # extra worker flags (its memory share)


@dataclass(frozen=True)
class Layout:
    workers: tuple[WorkerPlan, ...]  # in start order
    description: str  # for the ready line


def _gpu(device: str) -> str | None:
    """The GPU a device string names, "cuda" being the current one (index 0 here); None off the GPU."""
    if not device.startswith("cuda"):
        return None
    return device if ":" in device else "cuda:0"


def plan_layout(
    mode: str, device: str, prefill_device: str | None = None, decode_device: str | None = None,
    prefill_memory_share: float = 0.2, gpu_memory_utilization: float = 0.9,
) -> Layout:
    """``colocated``: one worker that prefills and decodes (the router sends it whole requests).
    ``disaggregated``: a prefill and a decode worker, on ``prefill_device``/``decode_device``
    (default ``device``). On one GPU the KV memory is split: the prefill worker gets
    ``prefill_memory_share`` of ``gpu_memory_utilization``, the decode worker the rest."""
    if mode == COLOCATED:
        return Layout((WorkerPlan("decode", device),), f"colocated: one worker prefills and decodes on {device}")
    if mode != DISAGGREGATED:
        raise ValueError(f"mode must be {DISAGGREGATED!r} or {COLOCATED!r}, got {mode!r}")
    if not 0 < prefill_memory_share < 1:
        raise ValueError(f"prefill_memory_share must be in (0, 1), got {prefill_memory_share}")
    pd, dd = prefill_device or device, decode_device or device
    gpu = _gpu(pd)
    if gpu is None or gpu != _gpu(dd):
        where = f"prefill on {pd}, decode on {dd}" if pd != dd else f"prefill and decode on {pd}"
        return Layout((WorkerPlan("prefill", pd), WorkerPlan("decode", dd)), f"disaggregated: {where}")
    prefill_share = gpu_memory_utilization * prefill_memory_share
    # of what the prefill worker leaves free (its weights aside): the rest of the total
    decode_share = (gpu_memory_utilization - prefill_share) / (1 - prefill_share)
    return Layout(
        (
            WorkerPlan("prefill", pd, ("--gpu-memory-utilization", f"{prefill_share:.4f}")),
            WorkerPlan("decode", dd, ("--gpu-memory-utilization", f"{decode_share:.4f}")),
        ),
        f"disaggregated on one GPU ({gpu}): prefill and decode split its KV memory "
        f"{prefill_memory_share:.0%}/{1 - prefill_memory_share:.0%}, KV moved by CUDA IPC",
    )
