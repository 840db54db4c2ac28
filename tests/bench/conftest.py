"""Shared pieces of the benchmark tests: a scripted Generation server on loopback (real
gRPC, no model) and the consistency checks every results file must pass, against the
fake here and against a real ``splitserve up`` in the end-to-end test."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from splitserve.v1 import generation_pb2 as pb
from splitserve.v1 import generation_pb2_grpc as pb_grpc

FAKE_VOCAB = 1000
FAKE_MAX_MODEL_LEN = 256
FAKE_MAX_TOKENS = 64
FAKE_EOS = 2


class FakeGeneration(pb_grpc.GenerationServicer):
    """Streams ``max_tokens`` tokens in chunks of 1, 2, 1, 2, ... tokens, so the client
    meets multi-token chunks. Text prompts select failure behaviours by name."""

    def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        return pb.ModelInfo(
            model="fake", architecture="none", max_model_len=FAKE_MAX_MODEL_LEN, vocab_size=FAKE_VOCAB,
            eos_token_ids=[FAKE_EOS], max_tokens_limit=FAKE_MAX_TOKENS, block_size=16,
        )

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        if request.max_tokens > FAKE_MAX_TOKENS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_tokens {request.max_tokens} > {FAKE_MAX_TOKENS}")
        if any(t >= FAKE_VOCAB or t == FAKE_EOS for t in request.token_ids.ids):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt token outside the vocabulary, or EOS")
        behaviour = request.text if request.WhichOneof("prompt") == "text" else ""
        prompt_len = len(request.token_ids.ids) if not behaviour else len(behaviour.split())
        if behaviour == "slow":
            time.sleep(2.0)
        sent, size = 0, 1
        while sent < request.max_tokens:
            n = min(size, request.max_tokens - sent)
            time.sleep(0.002)
            yield pb.GenerateResponse(delta=pb.Delta(text="x" * n, token_ids=list(range(sent, sent + n))))
            sent, size = sent + n, 3 - size
        if behaviour == "no-final":
            return
        reason = pb.FINISH_REASON_ABORT if behaviour == "abort" else pb.FINISH_REASON_LENGTH
        usage = pb.Usage(prompt_tokens=prompt_len, completion_tokens=sent, cached_prompt_tokens=0)
        yield pb.GenerateResponse(final=pb.Final(request_id=request.request_id, finish_reason=reason, usage=usage))


@pytest.fixture(scope="module")
def fake_target() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    pb_grpc.add_GenerationServicer_to_server(FakeGeneration(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def check_results_file(path: Path, num_prompts: int, num_points: int) -> dict[str, Any]:
    """Every number in the results file agrees with the per-request records in it."""
    doc = json.loads(path.read_text())
    assert doc["schema"] == "splitserve.bench.serve/1"
    assert doc["config"]["command"].startswith("splitserve bench serve ")
    assert doc["model_info"]["vocab_size"] > 0
    assert len(doc["points"]) == num_points
    for point in doc["points"]:
        m, records = point["metrics"], point["records"]
        assert len(records) == num_prompts == m["num_requests"]
        assert sorted(r["index"] for r in records) == list(range(num_prompts))
        ok = [r for r in records if r["error_code"] is None]
        failed = [r for r in records if r["error_code"] is not None]
        assert m["completed"] == len(ok) and m["failed"] == len(failed)
        assert sum(m["failed_by_code"].values()) == len(failed)
        for r in ok:
            # What streamed is what the server says it generated, and what was asked.
            assert sum(r["chunk_num_tokens"]) == r["usage"]["completion_tokens"]
            if r["prompt_len"] is not None:
                assert r["usage"]["prompt_tokens"] == r["prompt_len"]
            assert r["send_time"] >= 0 and r["end_time"] >= r["chunk_times"][-1]
        assert m["total_output_tokens"] == sum(r["usage"]["completion_tokens"] for r in ok)
        assert m["total_input_tokens"] == sum(r["usage"]["prompt_tokens"] for r in ok)
        assert m["request_throughput"] == pytest.approx(len(ok) / m["duration"])
        assert m["output_throughput"] == pytest.approx(m["total_output_tokens"] / m["duration"])
        last_end = max(r["end_time"] for r in records)
        assert m["duration"] >= last_end - 1e-6  # every response came in inside the duration
        if not ok:
            continue
        # TTFT, TPOT, ITL and E2EL recomputed from the raw timestamps.
        ttfts = [r["chunk_times"][0] - r["send_time"] for r in ok]
        e2els = [r["chunk_times"][-1] - r["send_time"] for r in ok]
        itls = [b - a for r in ok for a, b in zip(r["chunk_times"], r["chunk_times"][1:])]
        tpots = [
            (r["chunk_times"][-1] - r["chunk_times"][0]) / (r["usage"]["completion_tokens"] - 1)
            for r in ok if r["usage"]["completion_tokens"] > 1
        ]
        for name, values in (("ttft", ttfts), ("e2el", e2els), ("itl", itls), ("tpot", tpots)):
            assert m[f"num_{name}_samples"] == len(values)
            if values:
                assert m[f"mean_{name}_ms"] == pytest.approx(1000 * np.mean(values))
                assert m[f"median_{name}_ms"] == pytest.approx(1000 * np.median(values))
                assert m[f"p99_{name}_ms"] == pytest.approx(1000 * np.percentile(values, 99))
        # Per request, the decode phase is the sum of its gaps.
        for r in ok:
            gaps = np.diff(r["chunk_times"])
            assert math.isclose(gaps.sum(), r["chunk_times"][-1] - r["chunk_times"][0], abs_tol=1e-9)
    return doc


@pytest.fixture
def check_results() -> Callable[[Path, int, int], dict[str, Any]]:
    return check_results_file


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


@pytest.fixture
def check_png() -> Callable[[Path], None]:
    return assert_png
