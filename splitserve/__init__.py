"""splitserve: LLM serving with prefill and decode disaggregated."""
import sys
from pathlib import Path

# Run from the checkout (`python3 -m pytest`, `splitserve up`, whose workers are started with
# `-m`), the checkout is first on sys.path and its top-level services/, kvtransfer/ and
# kernels/ folders shadow installed packages of those names: transformers imports PyPI's
# `kernels`. They are installed under splitserve; the checkout itself need not be on the path.
# (Installed from a wheel, the parent is site-packages, which stays.)
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file():
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _CHECKOUT]

from splitserve.engine.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in torch and transformers; import it only when asked for.
    if name == "LLM":
        from splitserve.llm import LLM

        return LLM
    raise AttributeError(name)
