"""splitserve: LLM serving with prefill and decode disaggregated."""
from splitserve.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in torch and transformers; import it only when asked for.
    if name == "LLM":
        from splitserve.llm import LLM

        return LLM
    raise AttributeError(name)
