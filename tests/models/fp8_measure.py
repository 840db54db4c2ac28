"""Next-token distributions of a checkpoint under a choice of dtypes, for the fp8 agreement tests."""
from __future__ import annotations

from pathlib import Path

import torch

from splitserve.config import CacheConfig, ModelConfig
from splitserve.engine.model_runner import ModelRunner
from splitserve.kernels.attention_metadata import AttentionMetadata, with_device_tensors

# The fixed prompt set: 8 prompts of 24 to 80 tokens, ids drawn with a fixed seed.
NUM_PROMPTS, BLOCK_SIZE = 8, 4


def prompt_set(vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    lengths = torch.randint(24, 81, (NUM_PROMPTS,), generator=g).tolist()
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def log_probs(
    model_dir: Path, dtype: str, kv_cache_dtype: str = "auto", quantization: str | None = None, device: str = "cpu"
) -> torch.Tensor:
    """Log-probabilities (fp32, on the CPU) of the next token after every prefix of every prompt, prompts
    concatenated: [rows, vocab]. On CUDA through the Triton kernels (eagerly: a prompt is not a decode step)."""
    runner = ModelRunner(
        ModelConfig(model_dir, dtype=dtype, quantization=quantization, device=device),
        CacheConfig(block_size=BLOCK_SIZE, num_blocks=32, kv_cache_dtype=kv_cache_dtype),
    )
    out = []
    for prompt in prompt_set(runner.arch.vocab_size):
        n = len(prompt)
        positions = torch.arange(n, device=device)
        meta = AttentionMetadata(
            query_start_loc=[0, n], context_lens=[n], block_tables=[list(range(-(-n // BLOCK_SIZE)))],
            slot_block=positions // BLOCK_SIZE, slot_offset=positions % BLOCK_SIZE, block_size=BLOCK_SIZE,
        )
        if runner.backend.needs_device_tensors:
            meta = with_device_tensors(meta, runner.device)
        hidden = runner.model(torch.tensor(prompt, device=device), positions, runner.kv_cache, meta, runner.backend)
        out.append(torch.log_softmax(runner.model.compute_logits(hidden).float(), dim=-1).cpu())
    return torch.cat(out)


def agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || other) in nats) over the rows."""
    top1 = (reference.argmax(-1) == other.argmax(-1)).float().mean().item()
    kl = (reference.exp() * (reference - other)).sum(-1).mean().item()
    return top1, kl
