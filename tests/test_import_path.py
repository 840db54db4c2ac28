"""`import splitserve` run in the checkout, which is then first on sys.path."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    # `-c` puts the working directory first on sys.path, as `python3 -m pytest` and `-m` workers do.
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_run_in_the_checkout_its_top_level_folders_shadow_nothing():
    # The checkout's kernels/ is splitserve.kernels; `kernels` is another package (transformers imports PyPI's).
    code = "import importlib.util, splitserve; spec = importlib.util.find_spec('kernels'); print(spec and spec.origin)"
    result = run_python(code, REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() != str(REPO / "kernels" / "__init__.py"), result.stdout
    loaded = run_python("import splitserve; from transformers import LlamaConfig; print(LlamaConfig.model_type)", REPO)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "llama", loaded.stderr[-2000:]

