"""The environment scripts/install.sh makes: checked from inside it, as `.ci/run` runs the suite.

Other interpreters (a developer's own environment) skip these, visibly.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"
DEBIAN_PYTHON = Path("/usr/bin/python3")

pytestmark = pytest.mark.skipif(
    Path(sys.prefix).resolve() != VENV.resolve(), reason="runs in the environment scripts/install.sh made (.venv)"
)


def test_the_environment_runs_on_debians_own_python():
    config = dict(
        line.split(" = ", 1) for line in (VENV / "pyvenv.cfg").read_text().splitlines() if " = " in line
    )
    if DEBIAN_PYTHON.exists():
        assert Path(config["home"]) == DEBIAN_PYTHON.parent, config
        assert Path(sys.base_prefix) == Path("/usr")
    assert sys.version_info >= (3, 11)


def test_it_holds_the_cpu_build_of_torch_and_nixl():
    import nixl  # noqa: F401 - the import shim over nixl-cu13
    import torch

    assert torch.__version__.split("+")[0] == "2.13.0"
    if shutil.which("nvidia-smi") is None:
        assert torch.version.cuda is None, f"{torch.__version__} is a CUDA build on a machine without a GPU"


def test_splitserve_runs_from_the_checkout_and_redis_is_installed():
    import splitserve

    assert Path(splitserve.__file__).resolve().parent == REPO / "splitserve"  # editable
    assert (VENV / "bin" / "splitserve").exists()
    assert shutil.which("redis-server") is not None
