"""A Redis control plane with a password (the chart's bundled Redis has one): the password
reaches the router and workers through --control-plane-password-env (a Secret's secretKeyRef in
a pod), never through arguments; a missing or wrong one is a one-line error."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitserve.controlplane.testing import free_port, require_redis_server

PASSWORD = "s3cret:with@odd/chars"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    require_redis_server()
    port = free_port()
    proc = subprocess.Popen(
        [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path_factory.mktemp("redis")), "--requirepass", PASSWORD],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True).returncode != 0:
        assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
        time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait()


def router(model: Path, url: str, password: str | None) -> subprocess.Popen:
    env = {**os.environ, **({"CP_PASSWORD": password} if password is not None else {})}
    args = ["router", "--model", str(model), "--port", "0", "--http-port", "-1", "--metrics-port", "-1", "--control-plane", url,
            "--control-plane-password-env", "CP_PASSWORD"]
    return subprocess.Popen([sys.executable, "-m", "splitserve.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def test_the_password_from_the_environment_opens_redis(llama_tiny_dir, redis_url):
    proc = router(llama_tiny_dir, redis_url, PASSWORD)
    try:
        line = proc.stdout.readline()
        assert "splitserve router listening on" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert PASSWORD not in " ".join(proc.args)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.mark.parametrize("password,expected", [("wrong", "invalid username-password"), (None, "CP_PASSWORD is not set")])
def test_a_wrong_or_missing_password_is_one_line(llama_tiny_dir, redis_url, password, expected):
    proc = router(llama_tiny_dir, redis_url, password)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert PASSWORD not in err and "wrong" not in err  # the URL is shown without its password


def test_without_the_flag_redis_refuses(llama_tiny_dir, redis_url):
    result = subprocess.run([sys.executable, "-m", "splitserve.cli", "router", "--model", str(llama_tiny_dir), "--port", "0",
                             "--http-port", "-1", "--metrics-port", "-1", "--control-plane", redis_url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "unavailable" in result.stderr, result.stderr
