"""The generated stubs in splitserve/v1 match what protoc makes from proto/ now."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", REPO / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_fresh(tmp_path):
    fresh = _load_generator().generate(tmp_path)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        committed = REPO / "splitserve" / "v1" / path.name
        assert committed.is_file(), f"{committed} is missing: run python proto/generate.py"
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run python proto/generate.py"
    names = {p.name for p in fresh}
    extra = {p.name for p in (REPO / "splitserve" / "v1").glob("*_pb2*.py*")} - names
    assert not extra, f"stubs without a .proto: {sorted(extra)}"
