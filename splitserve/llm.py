"""The offline API: ``LLM(model_dir).generate(prompts, SamplingParams(...))`` for scripts and tests."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path

from splitserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig, default_kv_cache_bytes
from splitserve.engine.engine import LLMEngine
from splitserve.engine.request import FinishReason, TokenLogprob
from splitserve.engine.sampling_params import SamplingParams
from splitserve.tokenizer import load_tokenizer


@dataclass(frozen=True)
class CompletionOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: FinishReason
    num_cached_tokens: int
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # with SamplingParams.prompt_logprobs: one per prompt token after the first


class LLM:
    """Runs an engine in the calling thread until every prompt is done. CPU or CUDA, same code."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: str | None = None,
        cache: CacheConfig | None = None,
        scheduler: SchedulerConfig = SchedulerConfig(),
        max_model_len: int | None = None,
        quantization: str | None = None,
        speculative: SpeculativeConfig = SpeculativeConfig(),
    ) -> None:
        """``quantization``: "fp8" for fp8 linear weights, "none" to keep ``dtype``, None: the checkpoint's.
        An fp8 KV cache is ``cache=CacheConfig(kv_cache_dtype="fp8", ...)``. ``speculative``: see
        docs/speculative_decoding.md."""
        config = self.engine_config(model_dir, device, dtype, cache, scheduler, max_model_len, quantization)
        self.engine = LLMEngine(replace(config, speculative=speculative))
        self.tokenizer = load_tokenizer(model_dir)
        self._ids = itertools.count()

    @staticmethod
    def engine_config(
        model_dir: str | Path, device: str = "cpu", dtype: str | None = None, cache: CacheConfig | None = None,
        scheduler: SchedulerConfig = SchedulerConfig(), max_model_len: int | None = None, quantization: str | None = None,
    ) -> EngineConfig:
        """The engine's config. ``cache`` None: the workers' default for the device, so on CUDA the
        KV cache takes ``gpu_memory_utilization`` (0.9) of the memory the weights leave free; pass
        ``CacheConfig(kv_cache_bytes=None, gpu_memory_utilization=0.5)`` for another share, or
        ``CacheConfig(kv_cache_bytes=N)`` for a fixed budget."""
        model = ModelConfig(Path(model_dir), dtype=dtype, device=device, max_model_len=max_model_len, quantization=quantization)
        cache = cache if cache is not None else CacheConfig(kv_cache_bytes=default_kv_cache_bytes(device))
        return EngineConfig(model=model, cache=cache, scheduler=scheduler)

    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] = SamplingParams()
    ) -> list[CompletionOutput]:
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        order: list[str] = []
        prompt_ids: dict[str, list[int]] = {}
        for prompt, p in zip(prompts, params_list, strict=True):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, ids, p)
            order.append(request_id)
            prompt_ids[request_id] = ids
        tokens: dict[str, list[int]] = {r: [] for r in order}
        logprobs: dict[str, list[TokenLogprob]] = {r: [] for r in order}
        prompt_logprobs: dict[str, list[TokenLogprob]] = {r: [] for r in order}
        done: dict[str, tuple[FinishReason, int]] = {}
        while len(done) < len(order):
            for out in self.engine.step().outputs:
                tokens[out.request_id] += out.new_token_ids
                logprobs[out.request_id] += out.new_logprobs
                prompt_logprobs[out.request_id] += out.prompt_logprobs
                if out.finished:
                    done[out.request_id] = (out.finish_reason, out.num_cached_tokens)
        return [
            CompletionOutput(
                request_id=r,
                prompt_token_ids=prompt_ids[r],
                token_ids=tokens[r],
                text=self.tokenizer.decode(tokens[r], skip_special_tokens=True),
                logprobs=logprobs[r],
                finish_reason=done[r][0],
                num_cached_tokens=done[r][1],
                prompt_logprobs=prompt_logprobs[r],
            )
            for r in order
        ]
