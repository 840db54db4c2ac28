"""``bench serve`` against a real ``splitserve up`` on loopback with a tiny random-weight
checkpoint: the results file is consistent with itself and with what the server
reported, and injected failures are reported as failures with their gRPC codes."""
from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitserve.bench.serve import main
from splitserve.testing.cluster import Service

pytestmark = [pytest.mark.slow]

LISTENING = re.compile(r"splitserve router listening on (\S+):(\d+)")
STARTUP_TIMEOUT_S = 240.0
# Runs `splitserve up` exactly as the console script does, without relying on PATH.
CLI = "import sys; from splitserve.cli import main; sys.argv[0] = 'splitserve'; sys.exit(main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from splitserve.models.checkpoint_init import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama", "tiny")


@pytest.fixture(scope="module")
def worker_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The platform's worker key: a second router of the same platform needs it too."""
    path = tmp_path_factory.mktemp("keys") / "worker-keys"
    path.write_text("bench-test-worker-key\n")
    return path


@pytest.fixture(scope="module")
def router_target(tiny_model: Path, worker_keys: Path) -> Iterator[str]:
    model = tiny_model
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "up", "--model", str(model), "--port", str(free_port()), "--http-port", "0",
         "--worker-keys-file", str(worker_keys)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own group: its workers can be cleaned up by this group id
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    target = None
    try:
        while target is None:
            try:
                line = lines.get(timeout=STARTUP_TIMEOUT_S)
            except queue.Empty:
                pytest.fail(f"splitserve up did not say it was listening in {STARTUP_TIMEOUT_S}s:\n{''.join(seen)}")
            if line is None:
                pytest.fail(f"splitserve up exited ({proc.wait()}) before listening:\n{''.join(seen)}")
            seen.append(line)
            if match := LISTENING.search(line):
                host, port = match.groups()
                host = host.strip("[]")
                target = f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"
        yield target
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # it drains and stops its workers on SIGINT
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_bench_serve_against_splitserve_up(router_target: str, tmp_path: Path, check_results, check_png) -> None:
    argv = [
        "--target", router_target, "--num-prompts", "8", "--input-len", "24", "--output-len", "8",
        "--range-ratio", "0.25", "--prefix-len", "16", "--num-prefixes", "2", "--request-rate", "20,inf",
        "--concurrency", "4", "--goodput", "ttft:60000", "e2el:120000", "--seed", "0",
        "--request-timeout", "120", "--out", str(tmp_path), "--label", "e2e", "--disable-tqdm",
    ]
    assert main(argv) == 0
    doc = check_results(tmp_path / "e2e.json", num_prompts=8, num_points=2)
    assert doc["model_info"]["vocab_size"] > 0 and doc["model_info"]["max_model_len"] >= 64
    for point in doc["points"]:
        m = point["metrics"]
        assert m["failed"] == 0, m["failed_by_code"]
        assert m["max_in_flight_requests"] <= 4
        for r in point["records"]:
            # ignore_eos: the server generated exactly max_tokens, and said so.
            assert r["usage"]["completion_tokens"] == r["max_tokens"]
            assert r["finish_reason"] == "length"
            assert r["usage"]["prompt_tokens"] == r["prompt_len"]
            assert 0 <= r["usage"]["cached_prompt_tokens"] <= r["prompt_len"]
        assert m["mean_tpot_ms"] > 0 and m["num_itl_samples"] > 0
    for name in ("latency_cdf", "throughput", "tail_latency"):
        check_png(tmp_path / f"e2e_{name}.png")


def test_injected_failures_are_reported_with_their_codes(router_target: str, tmp_path: Path, check_results) -> None:
    argv = [
        "--target", router_target, "--num-prompts", "8", "--input-len", "16", "--output-len", "4",
        "--inject-invalid", "0.25", "--seed", "1", "--request-timeout", "120", "--out", str(tmp_path),
        "--disable-tqdm",
    ]
    assert main(argv) == 0
    doc = check_results(tmp_path / "splitserve.json", num_prompts=8, num_points=1)
    m, records = doc["points"][0]["metrics"], doc["points"][0]["records"]
    injected = [r for r in records if r["injected_invalid"]]
    assert len(injected) == 2 and m["failed"] == 2 and m["completed"] == 6
    # max_tokens over the limit is bad input: INVALID_ARGUMENT (the router's contract, issue 3).
    assert m["failed_by_code"] == {"INVALID_ARGUMENT": 2}
    assert all(r["error_code"] == "INVALID_ARGUMENT" and r["error_message"] for r in injected)
    assert all(r["error_code"] is None for r in records if not r["injected_invalid"])


def test_sampling_options_reach_the_server(router_target: str, tmp_path: Path, check_results) -> None:
    common = ["--target", router_target, "--num-prompts", "4", "--input-len", "16", "--output-len", "6", "--num-warmups", "0",
              "--request-timeout", "120", "--out", str(tmp_path), "--disable-tqdm"]
    assert main([*common, "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--label", "sampled"]) == 0
    doc = check_results(tmp_path / "sampled.json", num_prompts=4, num_points=1)
    assert doc["points"][0]["metrics"]["failed"] == 0
    assert dict(doc["config"]["client"]["sampling"]) == {"temperature": 0.8, "top_p": 0.9, "top_k": 20}
    # A temperature the server refuses fails every request, naming the field: it was sent (and the run exits 1).
    assert main([*common, "--temperature", "-1", "--label", "refused"]) == 1
    records = check_results(tmp_path / "refused.json", num_prompts=4, num_points=1)["points"][0]["records"]
    assert all(r["error_code"] == "INVALID_ARGUMENT" and "temperature" in r["error_message"] for r in records)


def test_bench_serve_spreads_requests_over_several_routers(
    router_target: str, tiny_model: Path, worker_keys: Path, tmp_path: Path, check_results
) -> None:
    """A second router of the same platform (the first router's store as its control plane):
    `--target A,B` sends requests to both in turn, and the second one serves its half."""
    env = {**os.environ, "NIXL_LOG_LEVEL": "WARN", "PYTHONUNBUFFERED": "1"}
    second = None
    try:
        second = Service("router", ["--model", str(tiny_model), "--port", "0", "--metrics-port", "0", "--http-port", "-1",
                                    "--control-plane", f"grpc://{router_target}", "--worker-keys-file", str(worker_keys)], env)
        second_target = second.wait_ready()
        argv = ["--target", f"{router_target},{second_target}", "--num-prompts", "8", "--input-len", "16",
                "--output-len", "4", "--num-warmups", "0", "--seed", "2", "--request-timeout", "120",
                "--out", str(tmp_path), "--label", "two-routers", "--disable-tqdm"]
        assert main(argv) == 0
        m = check_results(tmp_path / "two-routers.json", num_prompts=8, num_points=1)["points"][0]["metrics"]
        assert m["completed"] == 8, m["failed_by_code"]
        with urllib.request.urlopen(f"http://127.0.0.1:{second.metrics_port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        served = re.search(r'splitserve_requests_total\{outcome="ok",role="router"\} (\S+)', metrics)
        assert served and float(served.group(1)) == 4, metrics[-2000:]
    finally:
        if second is not None:
            second.stop()


def test_targets_that_serve_different_models_are_refused(router_target: str, fake_target: str, tmp_path: Path, capsys) -> None:
    argv = ["--target", f"{router_target},{fake_target}", "--num-prompts", "2", "--input-len", "8", "--output-len", "2",
            "--out", str(tmp_path), "--disable-tqdm"]
    assert main(argv) == 2
    assert "the targets serve different models" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
