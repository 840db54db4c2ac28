"""Fixtures shared across the test tree: tiny random checkpoints, engines, and transformers references.

The checkpoints are written by the project itself (random weights of the real
architectures, see ``splitserve.models.checkpoint_init``), once per session and only
for the architectures a test asks for.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from splitserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from splitserve.engine.engine import LLMEngine

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """``tiny_checkpoint("qwen3")`` -> the directory of a tiny random checkpoint, written on first use."""
    root = tmp_path_factory.mktemp("checkpoints")
    written: dict[tuple[str, str], Path] = {}

    def get(arch: str, preset: str = "tiny") -> Path:
        if (arch, preset) not in written:
            from splitserve.models.checkpoint_init import init_checkpoint  # imports transformers: only when needed

            written[arch, preset] = init_checkpoint(root / f"{arch}-{preset}", arch, preset)
        return written[arch, preset]

    return get


@pytest.fixture(scope="session")
def llama_tiny_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="session")
def make_engine() -> Callable[..., LLMEngine]:
    """An fp32 engine (CPU unless ``device``) with a small, explicit KV pool (no 256 MiB default allocation)."""

    def make(
        model_dir: Path,
        *,
        block_size: int = 4,
        num_blocks: int = 256,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        async_scheduling: bool | None = None,
        device: str = "cpu",
    ) -> LLMEngine:
        return LLMEngine(
            EngineConfig(
                model=ModelConfig(model_dir, dtype=torch.float32, device=device, max_model_len=max_model_len),
                cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching),
                scheduler=SchedulerConfig(
                    max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, async_scheduling=async_scheduling
                ),
            )
        )

    return make


def _run_engine(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list[int]]:
    """Steps until nothing is unfinished; returns each request's new token ids (held KV stays held)."""
    tokens: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished:
            return tokens
        for out in engine.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    raise AssertionError(f"engine did not finish in {max_steps} steps")


@pytest.fixture(scope="session")
def run_engine() -> Callable[..., dict[str, list[int]]]:
    return _run_engine


class HFReference:
    """Greedy generation with transformers on the same weights in fp32, cached per prompt."""

    def __init__(self) -> None:
        self._models: dict[Path, torch.nn.Module] = {}
        self._cache: dict[tuple[Path, tuple[int, ...], int], tuple[list[int], torch.Tensor]] = {}

    def model(self, model_dir: Path) -> torch.nn.Module:
        if model_dir not in self._models:
            from transformers import AutoModelForCausalLM

            self._models[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        return self._models[model_dir]

    def generate(self, model_dir: Path, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
        """The greedy tokens and the raw logits [max_new_tokens, vocab] behind each, EOS ignored."""
        key = (Path(model_dir), tuple(prompt), max_new_tokens)
        if key not in self._cache:
            with torch.inference_mode():
                out = self.model(Path(model_dir)).generate(
                    torch.tensor([prompt]),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=None,  # the engine runs with ignore_eos
                    pad_token_id=0,
                    return_dict_in_generate=True,
                    output_logits=True,
                )
            tokens = out.sequences[0, len(prompt) :].tolist()
            self._cache[key] = (tokens, torch.cat(out.logits).float())
        return self._cache[key]

    def tokens(self, model_dir: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
        return self.generate(model_dir, prompt, max_new_tokens)[0]


@pytest.fixture(scope="session")
def hf_reference() -> HFReference:
    return HFReference()
