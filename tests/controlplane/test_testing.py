"""The shared Redis helpers skip visibly without redis-server, and fail instead under CI."""
from __future__ import annotations

import shutil

import pytest

from splitserve.controlplane.testing import require_redis_server


def test_missing_redis_server_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server is not installed"):
        require_redis_server()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="redis-server is not installed"):
        require_redis_server()
