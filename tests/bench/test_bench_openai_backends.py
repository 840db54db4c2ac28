"""``bench serve --backend openai-completions|openai-chat`` against a real router with one
colocated decode worker: the same workload as over gRPC, timed as vLLM's benchmark times it
(a chunk is an SSE event with choices; TTFT is the first), with the server's usage."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitserve.bench.serve import main
from splitserve.testing.cluster import Cluster

pytestmark = [pytest.mark.slow]

WORKLOAD = ["--num-prompts", "6", "--input-len", "20", "--output-len", "8", "--request-rate", "inf", "--seed", "3",
            "--request-timeout", "120", "--ready-timeout", "120", "--disable-tqdm", "--no-plots"]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def cluster(model_dir: Path) -> Iterator[Cluster]:
    """A router and one decode worker that prefills too (the colocated setup of the GPU runs)."""
    cluster = Cluster(model_dir)
    try:
        cluster.add_workers(("decode", "decode-0"))
        yield cluster
    finally:
        cluster.stop()


def _http(cluster: Cluster) -> str:
    return cluster.router.http_url.removeprefix("http://").removesuffix("/v1")


def _run(tmp_path: Path, label: str, *args: str) -> dict:
    assert main([*args, *WORKLOAD, "--out", str(tmp_path), "--label", label]) == 0
    return json.loads((tmp_path / f"{label}.json").read_text())


def _records(doc: dict) -> list[dict]:
    [point] = doc["points"]
    assert point["metrics"]["failed"] == 0, point["metrics"]["failed_by_code"]
    return point["records"]


def test_openai_backends_measure_the_same_workload_as_grpc(cluster, model_dir, tmp_path):
    http = _http(cluster)
    grpc_doc = _run(tmp_path, "grpc", "--target", cluster.address)
    completions = _run(tmp_path, "completions", "--backend", "openai-completions", "--target", http)
    chat = _run(tmp_path, "chat", "--backend", "openai-chat", "--target", http, "--tokenizer", str(model_dir))
    assert completions["model_info"]["vocab_size"] == grpc_doc["model_info"]["vocab_size"] > 0
    by_index = {r["index"]: r for r in _records(grpc_doc)}
    for r in _records(completions):
        # Token-id prompts go as they are: the server saw the same prompt and generated as much.
        assert r["usage"]["prompt_tokens"] == by_index[r["index"]]["usage"]["prompt_tokens"] == r["prompt_len"]
        assert r["usage"]["completion_tokens"] == 8 and r["finish_reason"] == "length"
        # One event per step at most, plus the one that carries the finish reason; TTFT is the first.
        assert 2 <= len(r["chunk_times"]) <= 9 and r["chunk_times"][0] > r["send_time"]
    for r in _records(chat):
        assert r["usage"]["completion_tokens"] == 8 and r["usage"]["prompt_tokens"] > 0
        assert len(r["chunk_times"]) >= 2  # the role chunk counts, as in vLLM's chat timing
    m = completions["points"][0]["metrics"]
    assert m["completed"] == 6 and m["mean_ttft_ms"] > 0 and m["total_output_tokens"] == 48


def test_openai_chat_needs_a_tokenizer_for_random_prompts(cluster, capsys):
    assert main(["--backend", "openai-chat", "--target", _http(cluster), *WORKLOAD]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_an_http_server_that_is_not_there(tmp_path, capsys):
    args = ["--backend", "openai-completions", "--target", "127.0.0.1:9", *WORKLOAD]
    args[args.index("--ready-timeout") + 1] = "1"
    assert main(args) == 1
    assert "did not answer" in capsys.readouterr().err
