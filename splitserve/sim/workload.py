"""The simulator's requests: the same prompts and arrival times ``splitserve bench serve``
would send, drawn from the same seeds through the same functions, reduced to what the
simulator needs (lengths, shared prefix, arrival time).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from splitserve.bench.datasets import RandomDataset, random_requests
from splitserve.bench.loadgen import arrival_offsets


@dataclass(frozen=True)
class SimRequest:
    index: int
    arrival_s: float
    prompt_len: int
    output_len: int
    prefix_id: int | None = None  # requests with the same id share their first prefix_len tokens
    prefix_len: int = 0

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"request {self.index}: prompt_len and output_len must be >= 1")
        if self.arrival_s < 0 or not math.isfinite(self.arrival_s):
            raise ValueError(f"request {self.index}: arrival_s must be finite and >= 0")


@dataclass(frozen=True)
class WorkloadSpec:
    """A ``bench serve`` random-dataset run: its dataset flags, rate, burstiness and seed."""

    num_prompts: int
    input_len: int
    output_len: int
    request_rate: float
    range_ratio: float = 0.0
    prefix_len: int = 0
    num_prefixes: int = 1
    burstiness: float = 1.0
    seed: int = 0
    vocab_size: int = 128256  # the prompts' token ids don't matter, but the draws consume them
    excluded_token_ids: tuple[int, ...] = ()

    def dataset(self) -> RandomDataset:
        return RandomDataset(self.num_prompts, self.input_len, self.output_len, self.range_ratio,
                             self.prefix_len, self.num_prefixes)


def bench_requests(spec: WorkloadSpec) -> list[SimRequest]:
    """What ``bench serve --seed S`` sends at one sweep point (serve.run and
    build_requests: the data and arrival seeds are spawned the same way)."""
    data_seeds, arrival_seed = np.random.SeedSequence(spec.seed).spawn(2)
    data_seed, _inject_seed = data_seeds.spawn(2)
    dataset = spec.dataset()
    requests = random_requests(dataset, spec.vocab_size, np.random.default_rng(data_seed), spec.excluded_token_ids)
    offsets = arrival_offsets(len(requests), spec.request_rate, spec.burstiness, np.random.default_rng(arrival_seed))
    return [
        SimRequest(r.index, float(t), r.prompt_len, r.output_len, r.prefix_id, spec.prefix_len if r.prefix_id is not None else 0)
        for r, t in zip(requests, offsets)
    ]
