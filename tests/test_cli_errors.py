"""Every mistake a user can make on the `splitserve` command line ends in one line on stderr
and exit status 2: no traceback, no usage dump. Each runs the real command in a process."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def splitserve_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitserve.cli", *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1, result.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_version():
    result = splitserve_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("splitserve "), result
    assert result.stdout.split()[1][0].isdigit() or result.stdout.split()[1] == "unknown"


BAD_FLAGS = [
    (["prefill", "--model", "m", "--control-plane", "grpc://x:1", "--block-size", "0"], "--block-size: 0 is not a positive integer"),
    (["decode", "--model", "m", "--control-plane", "grpc://x:1", "--max-num-seqs", "many"], "--max-num-seqs: 'many' is not a positive integer"),
    (["decode", "--model", "m", "--control-plane", "grpc://x:1", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["prefill", "--model", "m", "--control-plane", "grpc://x:1", "--tp-size", "-2"], "--tp-size"),
    (["prefill", "--model", "m", "--control-plane", "grpc://x:1", "--transfer-timeout", "0"], "--transfer-timeout"),
    (["router", "--model", "m", "--port", "70000"], "--port: 70000 is not a port"),
    (["router", "--model", "m", "--max-tokens-limit", "0"], "--max-tokens-limit"),
    (["router", "--model", "m", "--policy", "random"], "--policy: invalid choice"),
    (["up", "--http-port", "-5"], "--http-port"),
    (["up", "--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
    (["router", "--model", "m", "--control-plane", "grpc://r:1", "--control-plane-password-env", "PW"], "redis://"),
    (["generate", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["prefill", "--model", "m"], "--control-plane"),  # a required flag missing
    (["serve"], "invalid choice"),
    ([], "required"),
]


@pytest.mark.parametrize("args,expected", BAD_FLAGS, ids=[" ".join(a[-2:]) or "nothing" for a, _ in BAD_FLAGS])
def test_bad_flag_values(args, expected):
    assert_one_line(splitserve_cli(*args, timeout=60), expected)


def test_missing_checkpoint(tmp_path):
    missing = tmp_path / "nowhere"
    for command in (["router", "--model", str(missing)], ["up", "--model", str(missing)]):
        assert_one_line(splitserve_cli(*command), str(missing), "does not exist")


def test_not_a_checkpoint(tmp_path):
    assert_one_line(splitserve_cli("router", "--model", str(tmp_path)), "no config.json")


def test_unsupported_architecture(tmp_path, model):
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    for command in (["router", "--model", str(tmp_path)], ["up", "--model", str(tmp_path)]):
        assert_one_line(splitserve_cli(*command), "GPT2LMHeadModel", "not supported")


def test_http_port_in_use(model, taken_port):
    result = splitserve_cli("router", "--model", str(model), "--port", "0", "--metrics-port", "-1", "--http-port", str(taken_port))
    assert_one_line(result, f"cannot listen on 127.0.0.1:{taken_port}")


def test_grpc_port_in_use(model, taken_port):
    result = splitserve_cli("router", "--model", str(model), "--port", str(taken_port), "--metrics-port", "-1", "--http-port", "-1")
    assert_one_line(result, f"127.0.0.1:{taken_port}")


def test_up_with_a_port_in_use(model, taken_port):
    result = splitserve_cli("up", "--model", str(model), "--port", str(free_port()), "--http-port", str(taken_port))
    assert_one_line(result, "router", f"cannot listen on 127.0.0.1:{taken_port}")


def test_generate_without_a_router():
    port = free_port()  # nothing listens there
    assert_one_line(splitserve_cli("generate", "hello", "--target", f"127.0.0.1:{port}"), f"no router answers at 127.0.0.1:{port}")


@pytest.mark.parametrize("url", ["redis://127.0.0.1:{port}/0", "grpc://127.0.0.1:{port}"])
def test_control_plane_unreachable(model, url):
    port = free_port()  # nothing listens there
    result = splitserve_cli("prefill", "--model", str(model), "--port", "0", "--metrics-port", "-1", "--control-plane", url.format(port=port))
    assert_one_line(result, "control plane", str(port))


def test_model_init_mistakes(tmp_path):
    assert_one_line(splitserve_cli("model", "init", str(tmp_path / "m"), "--preset", "llama-99b"), "llama-99b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    assert_one_line(splitserve_cli("model", "init", str(tmp_path / "full")), "--overwrite")


def test_a_bug_keeps_its_traceback():
    """Only the user's mistakes are shortened: anything else still shows where it happened."""
    from splitserve.cli_errors import user_error_message

    assert user_error_message(RuntimeError("a bug")) is None
    assert user_error_message(OSError(28, "No space left on device")) is None
    assert user_error_message(OSError(98, "Address already in use", "127.0.0.1:80")) == "cannot listen on 127.0.0.1:80: Address already in use"
