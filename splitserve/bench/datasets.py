"""Benchmark prompts: random token ids (optionally behind shared prefixes) or a JSONL file.

Everything is drawn from the numpy Generator passed in, so one seed gives the same
prompts. Lengths follow vLLM's random dataset: each is drawn uniformly from
[floor(len * (1 - r)), ceil(len * (1 + r))], and a shared prefix comes on top of the
sampled input length.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class BenchRequest:
    """One prompt to send. Exactly one of ``prompt_token_ids`` / ``prompt_text`` is set."""

    index: int
    prompt_token_ids: tuple[int, ...] | None
    prompt_text: str | None
    output_len: int  # the output length the workload asks for
    max_tokens: int  # what is sent; differs from output_len only for injected failures
    prefix_id: int | None = None  # which shared prefix the prompt starts with
    injected_invalid: bool = False

    def __post_init__(self) -> None:
        if (self.prompt_token_ids is None) == (self.prompt_text is None):
            raise ValueError("set exactly one of prompt_token_ids and prompt_text")
        if self.output_len < 1:
            raise ValueError(f"output_len must be at least 1, got {self.output_len}")

    @property
    def prompt_len(self) -> int | None:
        """Known for token prompts only: the client has no tokenizer for text."""
        return len(self.prompt_token_ids) if self.prompt_token_ids is not None else None


@dataclass(frozen=True)
class RandomDataset:
    num_prompts: int
    input_len: int  # tokens after the shared prefix
    output_len: int
    range_ratio: float = 0.0
    prefix_len: int = 0
    num_prefixes: int = 1

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be at least 1, got {self.num_prompts}")
        if self.input_len < 0 or self.output_len < 1:
            raise ValueError("input_len must be >= 0 and output_len >= 1")
        if self.input_len + self.prefix_len < 1:
            raise ValueError("a prompt needs at least one token: raise input_len or prefix_len")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range_ratio must lie in [0, 1), got {self.range_ratio}")
        if self.prefix_len < 0 or self.num_prefixes < 1:
            raise ValueError("prefix_len must be >= 0 and num_prefixes >= 1")

    def max_prompt_len(self) -> int:
        return self.prefix_len + math.ceil(self.input_len * (1 + self.range_ratio))

    def max_output_len(self) -> int:
        return max(math.ceil(self.output_len * (1 + self.range_ratio)), 1)


def sample_lengths(
    length: int, range_ratio: float, size: int, rng: np.random.Generator, minimum: int
) -> np.ndarray:
    low = max(math.floor(length * (1 - range_ratio)), minimum)
    high = max(math.ceil(length * (1 + range_ratio)), low)
    return rng.integers(low, high + 1, size=size)


def random_requests(
    spec: RandomDataset,
    vocab_size: int,
    rng: np.random.Generator,
    excluded_token_ids: Sequence[int] = (),
) -> list[BenchRequest]:
    """Uniform random token ids from the vocabulary, minus ``excluded_token_ids`` (EOS:
    an EOS inside a prompt is legal but makes the workload depend on the model)."""
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(excluded_token_ids, dtype=np.int64))
    if len(allowed) == 0:
        raise ValueError("no token ids left to sample from")

    def draw(n: int) -> np.ndarray:
        return allowed[rng.integers(0, len(allowed), size=n)]

    prefixes = [draw(spec.prefix_len) for _ in range(spec.num_prefixes)]
    # Without a prefix a prompt still needs one token of its own.
    min_input = 0 if spec.prefix_len else 1
    input_lens = sample_lengths(spec.input_len, spec.range_ratio, spec.num_prompts, rng, min_input)
    output_lens = sample_lengths(spec.output_len, spec.range_ratio, spec.num_prompts, rng, 1)
    requests = []
    for i in range(spec.num_prompts):
        # Round-robin, so every prefix is used equally often: routing tests want balance.
        prefix_id = i % spec.num_prefixes if spec.prefix_len else None
        prefix = prefixes[i % spec.num_prefixes]
        ids = np.concatenate([prefix, draw(int(input_lens[i]))])
        requests.append(
            BenchRequest(
                index=i,
                prompt_token_ids=tuple(int(t) for t in ids),
                prompt_text=None,
                output_len=int(output_lens[i]),
                max_tokens=int(output_lens[i]),
                prefix_id=prefix_id,
            )
        )
    return requests


def jsonl_requests(
    path: Path,
    num_prompts: int | None,
    default_output_len: int,
    rng: np.random.Generator,
    vocab_size: int,
) -> list[BenchRequest]:
    """Lines of ``{"prompt": str | [token ids], "output_len": int}`` (output_len optional).

    ``num_prompts`` None takes every line in file order; otherwise a seeded shuffle,
    repeated as often as needed to reach ``num_prompts``.
    """
    entries: list[tuple[tuple[int, ...] | None, str | None, int]] = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise ValueError(f"{where}: expected an object with a 'prompt' field")
        prompt, output_len = obj["prompt"], obj.get("output_len", default_output_len)
        if isinstance(output_len, bool) or not isinstance(output_len, int) or output_len < 1:
            raise ValueError(f"{where}: output_len must be a positive integer")
        if isinstance(prompt, str) and prompt:
            entries.append((None, prompt, output_len))
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            if not all(0 <= t < vocab_size for t in prompt):
                raise ValueError(f"{where}: token ids must lie in [0, {vocab_size})")
            entries.append((tuple(prompt), None, output_len))
        else:
            raise ValueError(f"{where}: prompt must be a non-empty string or list of token ids")
    if not entries:
        raise ValueError(f"{path}: no prompts")

    if num_prompts is None:
        order = list(range(len(entries)))
    else:
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be at least 1, got {num_prompts}")
        rounds = math.ceil(num_prompts / len(entries))
        order = [int(j) for _ in range(rounds) for j in rng.permutation(len(entries))][:num_prompts]
    return [
        BenchRequest(
            index=i,
            prompt_token_ids=entries[j][0],
            prompt_text=entries[j][1],
            output_len=entries[j][2],
            max_tokens=entries[j][2],
        )
        for i, j in enumerate(order)
    ]


def inject_invalid(
    requests: Sequence[BenchRequest], fraction: float, invalid_max_tokens: int, rng: np.random.Generator
) -> list[BenchRequest]:
    """Mark round(fraction * n) seeded-random requests to be sent with ``max_tokens`` over
    the server's limit, so a run exercises, and must report, failed requests."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the invalid fraction must lie in [0, 1], got {fraction}")
    count = round(fraction * len(requests))
    chosen = set(int(i) for i in rng.choice(len(requests), size=count, replace=False))
    return [
        replace(r, max_tokens=invalid_max_tokens, injected_invalid=True) if i in chosen else r
        for i, r in enumerate(requests)
    ]
