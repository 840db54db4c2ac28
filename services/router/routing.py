"""Routing policies: which prefill worker and which decode worker take a request.

Pure and synchronous: a policy scores a snapshot of candidates (``LiveWorker``s
from the control plane) and, for prefill, how many leading blocks of the prompt
each already holds. Nothing here does I/O, so a decision costs microseconds and
is the same in every router replica given the same view: ties are broken by
rendezvous hashing on a stable key (blake2b, never ``hash()``), which also
sends equal-cost prompts that share a first block to the same worker.

Policies, by name: ``prefix_aware`` (default), ``least_loaded``, ``round_robin``.
"""
from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from splitserve.controlplane.types import LiveWorker


class NoWorkerAvailable(Exception):
    """No live worker of the role to route to; the message names the role."""


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """Where a request goes and why (for logs and metrics)."""

    worker_id: str
    address: str
    policy: str  # "prefix_aware" | "least_loaded" | "round_robin"
    # prefix_hit: the chosen worker holds the longest prefix; load_over_prefix: a
    # worker with a longer prefix was too loaded; least_loaded: nobody holds any
    # of the prompt; load_only: the index was unavailable; round_robin: its turn;
    # fits / no_capacity: decode, whether the request's blocks fit right now.
    reason: str
    num_cached_tokens: int = 0  # prompt tokens the chosen worker is expected to hold
    cost: float = 0.0  # the policy's score of the chosen worker, lower is better


@dataclass(frozen=True, slots=True)
class CostWeights:
    """The knobs of the cost model; the defaults are a starting point, not a measurement."""

    # Prefill cost in prompt tokens: the worker's uncached part of this prompt,
    # plus load_weight times the work queued ahead of it there (tokens in
    # flight, and tokens_per_request for each waiting or running request).
    # 1.0 would minimise this request's time to first token alone; below 1 a
    # cache hit is worth some queueing, because sending a prefix elsewhere
    # computes it twice and caches it twice, and the copies crowd each other
    # out. Simulated shared-prefix traffic (tests/router/test_routing_index.py)
    # thrashes at 1.0 and computes each prefix once at 0.5.
    load_weight: float = 0.5
    tokens_per_request: int = 64
    # Decode cost: fraction of the KV cache in use once the request is placed,
    # plus decode_request_weight per running or waiting request.
    decode_request_weight: float = 0.02
    # A prompt token whose KV is on the worker's host tier costs this fraction of computing it:
    # the copy back. Between a GPU hit (0) and a miss (1); an 8B block of 16 tokens is 2 MiB,
    # ~0.04-0.1 ms over PCIe against ~0.5 ms to recompute it (an estimate, not a measurement).
    host_hit_weight: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.host_hit_weight <= 1:
            raise ValueError("host_hit_weight must be in [0, 1]")
        if self.load_weight < 0 or self.tokens_per_request < 0 or self.decode_request_weight < 0:
            raise ValueError("cost weights must not be negative")


class RoutingPolicy(Protocol):
    name: str

    def pick_prefill(
        self,
        block_hashes: Sequence[bytes],
        candidates: Sequence[LiveWorker],
        matches: Mapping[str, int] | None,
        num_prompt_tokens: int | None = None,
        host_matches: Mapping[str, int] | None = None,
    ) -> RoutingDecision:
        """``matches``: worker_id -> leading blocks held (``match_prefix``); None: index unavailable, route by load.
        ``host_matches``: how many of those blocks are on the worker's host tier (cost a copy back)."""
        ...

    def pick_decode(self, candidates: Sequence[LiveWorker], num_blocks_needed: int, tie_key: bytes = b"") -> RoutingDecision:
        """``tie_key`` (e.g. the request id) spreads equal-cost requests over equal workers."""
        ...


def should_skip_prefill(num_prompt_tokens: int, threshold: int, num_cached_tokens: int = 0) -> bool:
    """Conditional disaggregation: prefill on the decode worker when the uncached part is short.

    ``num_cached_tokens`` is what the decode worker itself already holds;
    ``threshold`` <= 0 turns the shortcut off.
    """
    return threshold > 0 and num_prompt_tokens - num_cached_tokens < threshold


def prefill_cost(
    worker: LiveWorker, num_prompt_tokens: int, num_matched_blocks: int, weights: CostWeights, num_host_blocks: int = 0
) -> float:
    """``num_matched_blocks`` held in either tier, ``num_host_blocks`` of them on the host tier."""
    num_cached_tokens = min(num_matched_blocks * worker.info.block_size, num_prompt_tokens)
    num_host_tokens = min(num_host_blocks * worker.info.block_size, num_cached_tokens)
    load = worker.load
    num_queued_tokens = load.num_tokens_in_flight + weights.tokens_per_request * (load.num_waiting + load.num_running)
    return (num_prompt_tokens - num_cached_tokens) + weights.host_hit_weight * num_host_tokens + weights.load_weight * num_queued_tokens


def decode_cost(worker: LiveWorker, num_blocks_needed: int, weights: CostWeights) -> float:
    load = worker.load
    if load.num_total_blocks == 0:  # no capacity reported yet: as if full
        kv_usage = 1.0 + num_blocks_needed
    else:
        kv_usage = (load.num_total_blocks - load.num_free_blocks + num_blocks_needed) / load.num_total_blocks
    return kv_usage + weights.decode_request_weight * (load.num_running + load.num_waiting)


def rendezvous_rank(tie_key: bytes, worker_id: str) -> int:
    """Stable across processes and machines; the highest rank wins a tie."""
    digest = hashlib.blake2b(tie_key + b"\x00" + worker_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class PrefixAwarePolicy:
    """Prefill where the uncached work plus the queued work is least; decode where KV is freest."""

    name = "prefix_aware"

    def __init__(self, weights: CostWeights = CostWeights()) -> None:
        self.weights = weights

    def pick_prefill(
        self,
        block_hashes: Sequence[bytes],
        candidates: Sequence[LiveWorker],
        matches: Mapping[str, int] | None,
        num_prompt_tokens: int | None = None,
        host_matches: Mapping[str, int] | None = None,
    ) -> RoutingDecision:
        _require(candidates, "prefill")
        num_matched = matches if matches is not None else {}
        num_host = host_matches if matches is not None and host_matches is not None else {}
        costs = []
        for worker in candidates:
            worker_id = worker.info.worker_id
            num_tokens = num_prompt_tokens if num_prompt_tokens is not None else len(block_hashes) * worker.info.block_size
            costs.append(prefill_cost(worker, num_tokens, num_matched.get(worker_id, 0), self.weights, num_host.get(worker_id, 0)))
        best_cost = min(costs)
        best = _break_tie([w for w, c in zip(candidates, costs) if c == best_cost], block_hashes[0] if block_hashes else b"")
        num_blocks = num_matched.get(best.info.worker_id, 0)
        num_tokens = num_prompt_tokens if num_prompt_tokens is not None else len(block_hashes) * best.info.block_size
        num_cached_tokens = min(num_blocks * best.info.block_size, num_tokens)
        if matches is None:
            reason = "load_only"
        elif num_blocks > 0 and num_blocks >= max(num_matched.values(), default=0):
            reason = "prefix_hit"
        elif max(num_matched.values(), default=0) > 0:
            reason = "load_over_prefix"
        else:
            reason = "least_loaded"
        return RoutingDecision(best.info.worker_id, best.info.address, self.name, reason, num_cached_tokens, best_cost)

    def pick_decode(self, candidates: Sequence[LiveWorker], num_blocks_needed: int, tie_key: bytes = b"") -> RoutingDecision:
        _require(candidates, "decode")
        # A worker the request fits in now beats every worker it does not fit in, however idle.
        keys = [
            (w.load.num_free_blocks < num_blocks_needed, decode_cost(w, num_blocks_needed, self.weights)) for w in candidates
        ]
        best_key = min(keys)
        best = _break_tie([w for w, k in zip(candidates, keys) if k == best_key], tie_key)
        no_room, cost = best_key
        return RoutingDecision(best.info.worker_id, best.info.address, self.name, "no_capacity" if no_room else "fits", 0, cost)


class LeastLoadedPolicy(PrefixAwarePolicy):
    """The prefix-aware cost with every prefix ignored: a baseline, and what load-only routing does."""

    name = "least_loaded"

    def pick_prefill(
        self,
        block_hashes: Sequence[bytes],
        candidates: Sequence[LiveWorker],
        matches: Mapping[str, int] | None,
        num_prompt_tokens: int | None = None,
        host_matches: Mapping[str, int] | None = None,
    ) -> RoutingDecision:
        decision = super().pick_prefill(block_hashes, candidates, None, num_prompt_tokens)
        reason = "least_loaded" if matches is not None else "load_only"
        return RoutingDecision(decision.worker_id, decision.address, self.name, reason, 0, decision.cost)


class RoundRobinPolicy:
    """Each role's candidates in turn, by worker_id order; ignores load and prefixes (a baseline)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._turns = {"prefill": itertools.count(), "decode": itertools.count()}

    def pick_prefill(
        self,
        block_hashes: Sequence[bytes],
        candidates: Sequence[LiveWorker],
        matches: Mapping[str, int] | None,
        num_prompt_tokens: int | None = None,
        host_matches: Mapping[str, int] | None = None,
    ) -> RoutingDecision:
        worker = self._next("prefill", candidates)
        num_blocks = (matches or {}).get(worker.info.worker_id, 0)
        return RoutingDecision(worker.info.worker_id, worker.info.address, self.name, "round_robin", num_blocks * worker.info.block_size)

    def pick_decode(self, candidates: Sequence[LiveWorker], num_blocks_needed: int, tie_key: bytes = b"") -> RoutingDecision:
        worker = self._next("decode", candidates)
        return RoutingDecision(worker.info.worker_id, worker.info.address, self.name, "round_robin")

    def _next(self, role: str, candidates: Sequence[LiveWorker]) -> LiveWorker:
        _require(candidates, role)
        ordered = sorted(candidates, key=lambda w: w.info.worker_id)
        return ordered[next(self._turns[role]) % len(ordered)]


POLICIES = ("prefix_aware", "least_loaded", "round_robin")


def make_policy(name: str, weights: CostWeights = CostWeights()) -> RoutingPolicy:
    if name == "prefix_aware":
        return PrefixAwarePolicy(weights)
    if name == "least_loaded":
        return LeastLoadedPolicy(weights)
    if name == "round_robin":
        return RoundRobinPolicy()
    raise ValueError(f"routing policy must be one of {POLICIES}, got {name!r}")


def _break_tie(tied: list[LiveWorker], tie_key: bytes) -> LiveWorker:
    if len(tied) == 1:
        return tied[0]
    return max(tied, key=lambda w: rendezvous_rank(tie_key, w.info.worker_id))


def _require(candidates: Sequence[LiveWorker], role: str) -> None:
    if not candidates:
        raise NoWorkerAvailable(f"no live {role} worker to route to")
