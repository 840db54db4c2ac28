"""The built wheel ships what an installed splitserve needs: the stubs' type files and the mounted packages."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_ships_stub_types_and_mounted_packages(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("splitserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for stub in ("controlplane", "generation", "worker"):
        assert f"splitserve/v1/{stub}_pb2.pyi" in names
    for module in ("splitserve/services/router/generation.py", "splitserve/kvtransfer/agent.py", "splitserve/kernels/backend.py"):
        assert module in names
