"""The generated stubs in splitserve/v1 match what protoc makes from proto/ now."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh(tmp_path):
    # protoc runs in its own process: its extension module does not mix with everything a test run has imported.
    result = subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    fresh = sorted((tmp_path / "splitserve" / "v1").glob("*_pb2*.py*"))
    assert fresh, "protoc generated nothing"
    for path in fresh:
        committed = REPO / "splitserve" / "v1" / path.name
        assert committed.is_file(), f"{committed} is missing: run python proto/generate.py"
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run python proto/generate.py"
    extra = {p.name for p in (REPO / "splitserve" / "v1").glob("*_pb2*.py*")} - {p.name for p in fresh}
    assert not extra, f"stubs without a .proto: {sorted(extra)}"
