"""Benchmark prompts: lengths, shared prefixes, vocabulary bounds and seeding."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from splitserve.bench.datasets import RandomDataset, inject_invalid, jsonl_requests, random_requests

VOCAB = 500


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_lengths_stay_within_the_range_ratio() -> None:
    spec = RandomDataset(num_prompts=400, input_len=100, output_len=50, range_ratio=0.2, prefix_len=16)
    requests = random_requests(spec, VOCAB, rng())
    inputs = np.array([r.prompt_len - 16 for r in requests])
    outputs = np.array([r.output_len for r in requests])
    assert inputs.min() >= 80 and inputs.max() <= 120
    assert outputs.min() >= 40 and outputs.max() <= 60
    # The whole range is used, not a corner of it.
    assert inputs.min() <= 82 and inputs.max() >= 118
    assert all(r.max_tokens == r.output_len for r in requests)
    assert spec.max_prompt_len() == 136 and spec.max_output_len() == 60


def test_zero_range_ratio_gives_exact_lengths() -> None:
    requests = random_requests(RandomDataset(20, 33, 7), VOCAB, rng())
    assert {r.prompt_len for r in requests} == {33} and {r.output_len for r in requests} == {7}


def test_token_ids_stay_in_the_vocabulary_and_avoid_excluded_ids() -> None:
    requests = random_requests(RandomDataset(50, 200, 4), 10, rng(), excluded_token_ids=[2, 7])
    ids = np.concatenate([r.prompt_token_ids for r in requests])
    assert ids.min() >= 0 and ids.max() < 10
    assert not np.isin(ids, [2, 7]).any()
    assert set(ids.tolist()) == {0, 1, 3, 4, 5, 6, 8, 9}


def test_shared_prefixes_are_shared() -> None:
    spec = RandomDataset(num_prompts=12, input_len=20, output_len=4, prefix_len=32, num_prefixes=3)
    requests = random_requests(spec, VOCAB, rng())
    assert [r.prefix_id for r in requests] == [i % 3 for i in range(12)]
    prefixes = {}
    for r in requests:
        prefixes.setdefault(r.prefix_id, set()).add(r.prompt_token_ids[:32])
    assert all(len(p) == 1 for p in prefixes.values())  # one prefix per group
    assert len({next(iter(p)) for p in prefixes.values()}) == 3  # and three distinct ones
    # The suffixes are not shared.
    assert len({r.prompt_token_ids[32:] for r in requests}) == 12
    assert all(r.prefix_id is None for r in random_requests(RandomDataset(3, 5, 1), VOCAB, rng()))


def test_the_seed_decides_the_prompts() -> None:
    spec = RandomDataset(num_prompts=10, input_len=30, output_len=10, range_ratio=0.5, prefix_len=4, num_prefixes=2)
    assert random_requests(spec, VOCAB, rng(7)) == random_requests(spec, VOCAB, rng(7))
    assert random_requests(spec, VOCAB, rng(7)) != random_requests(spec, VOCAB, rng(8))


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_prompts=0), dict(range_ratio=1.0), dict(range_ratio=-0.1), dict(output_len=0),
     dict(input_len=0), dict(num_prefixes=0)],
)
def test_bad_random_specs_are_rejected(kwargs: dict) -> None:
    base = dict(num_prompts=4, input_len=8, output_len=4)
    with pytest.raises(ValueError):
        RandomDataset(**{**base, **kwargs})


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return path


def test_jsonl_prompts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "hello there", "output_len": 5}, {"prompt": [1, 2, 3]}, {"prompt": "third", "output_len": 9},
    ])
    requests = jsonl_requests(path, None, default_output_len=11, rng=rng(), vocab_size=VOCAB)
    assert [(r.prompt_text, r.prompt_token_ids, r.output_len) for r in requests] == [
        ("hello there", None, 5), (None, (1, 2, 3), 11), ("third", None, 9),
    ]
    assert requests[0].prompt_len is None and requests[1].prompt_len == 3

    seven = jsonl_requests(path, 7, 11, rng(3), VOCAB)
    assert [r.index for r in seven] == list(range(7))
    texts = [r.prompt_text or "ids" for r in seven]
    assert sorted(texts[:3]) == sorted(texts[3:6]) == ["hello there", "ids", "third"]  # each round uses every line
    assert seven == jsonl_requests(path, 7, 11, rng(3), VOCAB)


@pytest.mark.parametrize(
    "line",
    [{"text": "x"}, {"prompt": ""}, {"prompt": [1, VOCAB]}, {"prompt": "x", "output_len": 0}, {"prompt": "x", "output_len": True}],
)
def test_bad_jsonl_lines_name_their_line(tmp_path: Path, line: dict) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, line])
    with pytest.raises(ValueError, match=r"p\.jsonl:2"):
        jsonl_requests(path, None, 4, rng(), VOCAB)


def test_inject_invalid_marks_a_seeded_fraction() -> None:
    requests = random_requests(RandomDataset(20, 8, 4), VOCAB, rng())
    marked = inject_invalid(requests, 0.25, invalid_max_tokens=999, rng=rng(1))
    bad = [r for r in marked if r.injected_invalid]
    assert len(bad) == 5 and all(r.max_tokens == 999 and r.output_len == 4 for r in bad)
    assert all(r.max_tokens == 4 for r in marked if not r.injected_invalid)
    assert marked == inject_invalid(requests, 0.25, 999, rng(1))
    assert inject_invalid(requests, 0.0, 999, rng(1)) == requests
    with pytest.raises(ValueError):
        inject_invalid(requests, 1.5, 999, rng(1))
