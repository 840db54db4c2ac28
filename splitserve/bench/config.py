"""The benchmark's frozen configuration, built once from the command line and
validated as it is built."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from splitserve.bench.datasets import RandomDataset
from splitserve.bench.metrics import SLO_NAMES
from splitserve.bench.sweep import SweepPoint, sweep_points


@dataclass(frozen=True)
class DatasetConfig:
    kind: str  # "random" or "jsonl"
    num_prompts: int | None  # None with jsonl: every line of the file
    input_len: int
    output_len: int  # for jsonl: the default where a line gives none
    range_ratio: float = 0.0
    prefix_len: int = 0
    num_prefixes: int = 1
    path: Path | None = None  # the JSONL file
    inject_invalid: float = 0.0  # fraction sent with max_tokens over the server's limit

    def __post_init__(self) -> None:
        if self.kind not in ("random", "jsonl"):
            raise ValueError(f"dataset must be random or jsonl, got {self.kind!r}")
        if self.kind == "jsonl" and self.path is None:
            raise ValueError("--dataset jsonl needs --dataset-path")
        if self.kind == "random" and self.num_prompts is None:
            raise ValueError("the random dataset needs num_prompts")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be at least 1, got {self.num_prompts}")
        if not 0.0 <= self.inject_invalid <= 1.0:
            raise ValueError(f"--inject-invalid must lie in [0, 1], got {self.inject_invalid}")
        if self.kind == "random":
            self.random_spec()  # validates lengths and prefixes before anything connects

    def random_spec(self) -> RandomDataset:
        return RandomDataset(
            self.num_prompts, self.input_len, self.output_len, self.range_ratio, self.prefix_len, self.num_prefixes
        )


@dataclass(frozen=True)
class ClientConfig:
    target: str  # HOST:PORT of the router, or several, comma-separated (requests go round-robin)
    request_timeout_s: float
    ready_timeout_s: float  # how long to wait for the server to answer GetModelInfo
    ignore_eos: bool = True
    sampling: tuple[tuple[str, float], ...] = ()  # SamplingParams fields sent with each request; none: greedy
    backend: str = "grpc"  # or openai-completions / openai-chat (splitserve.bench.openai_client)
    tokenizer: Path | None = None  # HTTP backends: vocabulary, EOS ids and chat prompt text
    api_key: str | None = None  # HTTP backends

    def __post_init__(self) -> None:
        if self.backend not in ("grpc", "openai-completions", "openai-chat"):
            raise ValueError(f"--backend must be grpc, openai-completions or openai-chat, got {self.backend!r}")
        for target in self.targets:
            host, sep, port = target.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"--target must be HOST:PORT[,HOST:PORT...], got {self.target!r}")
        if not self.request_timeout_s > 0 or not self.ready_timeout_s > 0:
            raise ValueError("timeouts must be positive")

    @property
    def targets(self) -> list[str]:
        return [t.strip() for t in self.target.split(",")]


@dataclass(frozen=True)
class BenchConfig:
    client: ClientConfig
    dataset: DatasetConfig
    points: tuple[SweepPoint, ...]
    burstiness: float
    seed: int
    percentiles: tuple[float, ...]
    slos_ms: dict[str, float]
    num_warmups: int
    out_dir: Path | None
    plots: bool
    label: str
    progress: bool

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("nothing to run: no sweep points")
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be positive, got {self.burstiness}")
        if not self.percentiles or any(not 0 < p < 100 for p in self.percentiles):
            raise ValueError(f"--percentiles must lie in (0, 100), got {list(self.percentiles)}")
        if set(self.slos_ms) - set(SLO_NAMES):
            raise ValueError(f"goodput SLOs must be among {SLO_NAMES}")
        if self.num_warmups < 0:
            raise ValueError("--num-warmups must be >= 0")
        if not self.label or "/" in self.label:
            raise ValueError(f"--label must be a non-empty file-name stem, got {self.label!r}")
        if self.client.backend == "openai-chat" and self.dataset.kind == "random" and self.client.tokenizer is None:
            raise ValueError("--backend openai-chat sends text: random prompts (token ids) need --tokenizer to become text")

    @property
    def tail_percentile(self) -> float:
        """The percentile the summary table and the tail-latency plot show."""
        return max(self.percentiles)


def parse_rates(text: str) -> tuple[float, ...]:
    """``"1,2,4,inf"`` -> (1.0, 2.0, 4.0, inf)."""
    rates = []
    for word in text.split(","):
        try:
            rate = float(word)
        except ValueError:
            raise ValueError(f"--request-rate: {word!r} is not a number or inf") from None
        if not rate > 0 or math.isnan(rate):
            raise ValueError(f"--request-rate: {word!r} must be positive")
        rates.append(rate)
    return tuple(rates)


def parse_concurrencies(text: str | None) -> tuple[int | None, ...]:
    """``"1,8,64"`` -> (1, 8, 64); absent -> (None,), unbounded."""
    if text is None:
        return (None,)
    values = []
    for word in text.split(","):
        if not word.strip().isdigit() or int(word) < 1:
            raise ValueError(f"--concurrency: {word!r} is not a positive integer")
        values.append(int(word))
    return tuple(values)


def parse_percentiles(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(word) for word in text.split(","))
    except ValueError:
        raise ValueError(f"--percentiles: {text!r} is not a comma-separated list of numbers") from None


def make_points(rates: str, concurrencies: str | None) -> tuple[SweepPoint, ...]:
    return tuple(sweep_points(parse_rates(rates), parse_concurrencies(concurrencies)))
