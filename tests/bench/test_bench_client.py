"""The gRPC request function and ``main`` against a scripted Generation server on
loopback: real gRPC and real streams, but no model."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from splitserve.bench.client import ABORTED, NO_FINAL, GenerationClient, ModelInfo
from splitserve.bench.datasets import BenchRequest
from splitserve.bench.serve import main


def prompt(text: str | None = None, ids: tuple[int, ...] = (5, 6, 7), max_tokens: int = 5, **kw) -> BenchRequest:
    return BenchRequest(0, None if text else ids, text, output_len=5, max_tokens=max_tokens, **kw)


def generate(target: str, request: BenchRequest, timeout: float = 10.0):
    async def go():
        async with GenerationClient(target, timeout, ignore_eos=True) as client:
            return await client.generate(request, "req-0")
    return asyncio.run(go())


def model_info(target: str) -> ModelInfo:
    async def go():
        async with GenerationClient(target, 10.0, ignore_eos=True) as client:
            return await client.model_info(wait_s=5.0)
    return asyncio.run(go())


def test_model_info(fake_target: str) -> None:
    info = model_info(fake_target)
    assert (info.vocab_size, info.max_model_len, info.eos_token_ids) == (1000, 256, (2,))
    assert info.effective_max_tokens() == info.max_tokens_limit == 64


def test_a_stream_becomes_a_record(fake_target: str) -> None:
    r = generate(fake_target, prompt())
    assert r.success and r.finish_reason == "length" and r.request_id == "req-0"
    assert r.chunk_num_tokens == (1, 2, 1, 1)  # the fake's multi-token chunks, as they came
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens == r.prompt_len == 3
    assert r.send_time < r.chunk_times[0] <= r.chunk_times[-1] <= r.end_time


@pytest.mark.parametrize(
    "request_, timeout, code",
    [
        (prompt(max_tokens=65, injected_invalid=True), 10.0, "INVALID_ARGUMENT"),  # the fake's limit is 64
        (prompt("no-final"), 10.0, NO_FINAL),
        (prompt("abort"), 10.0, ABORTED),
        (prompt("slow"), 0.3, "DEADLINE_EXCEEDED"),
    ],
)
def test_failures_keep_their_codes(fake_target: str, request_: BenchRequest, timeout: float, code: str) -> None:
    r = generate(fake_target, request_, timeout)
    assert r.error_code == code and not r.success and r.error_message
    assert r.injected_invalid == request_.injected_invalid


def test_main_sweeps_and_writes_consistent_results(fake_target: str, tmp_path: Path, check_results, check_png) -> None:
    argv = [
        "--target", fake_target, "--num-prompts", "12", "--input-len", "8", "--output-len", "6",
        "--range-ratio", "0.5", "--prefix-len", "4", "--num-prefixes", "2", "--request-rate", "100,inf",
        "--concurrency", "4", "--goodput", "ttft:1000", "--seed", "3", "--out", str(tmp_path),
        "--label", "fake", "--disable-tqdm", "--num-warmups", "1",
    ]
    assert main(argv) == 0
    doc = check_results(tmp_path / "fake.json", num_prompts=12, num_points=2)
    assert [p["label"] for p in doc["points"]] == ["rate=100 conc=4", "rate=inf conc=4"]
    assert doc["points"][1]["request_rate"] == "inf" and doc["points"][0]["max_concurrency"] == 4
    for point in doc["points"]:
        m = point["metrics"]
        assert m["failed"] == 0 and m["max_in_flight_requests"] <= 4
        assert m["request_goodput"] is not None
        # ignore_eos: every request generated exactly what it asked for.
        assert all(r["usage"]["completion_tokens"] == r["max_tokens"] for r in point["records"])
    # Both points ran the same prompts.
    lens = [[r["prompt_len"] for r in p["records"]] for p in doc["points"]]
    assert lens[0] == lens[1] and len(set(lens[0])) > 1
    assert doc["config"]["seed"] == 3 and doc["config"]["dataset"]["prefix_len"] == 4
    for name in ("latency_cdf", "throughput", "tail_latency"):
        check_png(tmp_path / f"fake_{name}.png")


def test_injected_failures_are_reported(fake_target: str, tmp_path: Path, check_results, capsys) -> None:
    argv = ["--target", fake_target, "--num-prompts", "8", "--input-len", "4", "--output-len", "3",
            "--inject-invalid", "0.25", "--out", str(tmp_path), "--disable-tqdm", "--no-plots"]
    assert main(argv) == 0
    doc = check_results(tmp_path / "splitserve.json", num_prompts=8, num_points=1)
    m, records = doc["points"][0]["metrics"], doc["points"][0]["records"]
    assert m["failed"] == 2 and m["failed_by_code"] == {"INVALID_ARGUMENT": 2}
    assert {r["index"] for r in records if r["injected_invalid"]} == {r["index"] for r in records if r["error_code"]}
    out = capsys.readouterr().out
    assert "Failed requests:                         2" in out and "INVALID_ARGUMENT:" in out


def test_jsonl_dataset(fake_target: str, tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [{"prompt": "a b c", "output_len": 2}, {"prompt": [1, 3]}]))
    argv = ["--target", fake_target, "--dataset", "jsonl", "--dataset-path", str(path), "--output-len", "4",
            "--out", str(tmp_path), "--disable-tqdm", "--no-plots"]
    assert main(argv) == 0
    records = json.loads((tmp_path / "splitserve.json").read_text())["points"][0]["records"]
    assert [r["usage"]["completion_tokens"] for r in records] == [2, 4]
    assert [r["usage"]["prompt_tokens"] for r in records] == [3, 2]


def test_workloads_the_model_cannot_take_fail_before_sending(fake_target: str, capsys) -> None:
    assert main(["--target", fake_target, "--input-len", "300", "--output-len", "4", "--disable-tqdm"]) == 2
    assert "max_model_len" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["--target", "nowhere"], ["--target", "h:1", "--request-rate", "0"], ["--target", "h:1", "--concurrency", "0"],
     ["--target", "h:1", "--goodput", "itl:3"], ["--target", "h:1", "--range-ratio", "2"],
     ["--target", "h:1", "--dataset", "jsonl"], ["--target", "h:1", "--percentiles", "100"], ["--bogus"]],
)
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    assert main(argv) == 2


def test_an_unreachable_target_exits_1(capsys) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["--target", f"127.0.0.1:{port}", "--ready-timeout", "0.5", "--disable-tqdm"]) == 1
    assert "did not answer" in capsys.readouterr().err


def test_vocab_bound_holds_over_the_wire(fake_target: str, tmp_path: Path) -> None:
    # The fake rejects any prompt token outside its 1000-token vocabulary, or EOS.
    assert main(["--target", fake_target, "--num-prompts", "16", "--input-len", "200", "--output-len", "1",
                 "--out", str(tmp_path), "--disable-tqdm", "--no-plots"]) == 0
    doc = json.loads((tmp_path / "splitserve.json").read_text())
    assert doc["model_info"]["vocab_size"] == 1000
    m = doc["points"][0]["metrics"]
    assert m["failed"] == 0 and m["total_input_tokens"] == 16 * 200
    assert m["num_tpot_samples"] == 0 and m["mean_tpot_ms"] is None  # one token each: no TPOT
