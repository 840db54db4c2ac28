"""The engine: validates requests, and each step schedules, runs the model and samples.

Synchronous and single-threaded on purpose; services run ``step()`` in a
thread of their own and talk to it through queues.
"""
from __future__ import annotations

from dataclasses import dataclass

from splitserve.config import EngineConfig
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.errors import InvalidRequestError, QueueFullError
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.request import FinishReason, Request, TokenLogprob
from splitserve.engine.sampler import Sampler
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import KVLoad, RemoteKV, Scheduler


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StepResult:
    outputs: list[RequestOutput]
    kv_loads: list[KVLoad]  # transfers the caller must run, then report with finish_kv_load


class LLMEngine:
    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None) -> None:
        self.config = config
        self.runner = runner or ModelRunner(config.model, config.cache)
        self.block_size = config.cache.block_size
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.arch.vocab_size
        self.eos_token_ids = self.runner.arch.eos_token_ids
        self.block_pool = BlockPool(self.runner.num_blocks, config.cache.enable_prefix_caching)
        self.kv_cache_manager = KVCacheManager(self.block_pool, self.block_size)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager, self.max_model_len)
        self.sampler = Sampler()

    # -- requests ------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises InvalidRequestError naming the field; checks nothing that depends on load."""
        if not prompt_token_ids:
            raise InvalidRequestError("prompt", "is empty")
        bad = next((t for t in prompt_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError("prompt_token_ids", f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"has {len(prompt_token_ids)} tokens; the context length is {self.max_model_len}, leaving no room to generate"
            )
        if params.max_tokens > self.config.scheduler.max_tokens_limit:
            raise InvalidRequestError("max_tokens", f"{params.max_tokens} is over the limit {self.config.scheduler.max_tokens_limit}")
        num_blocks = self.kv_cache_manager.num_blocks_for(len(prompt_token_ids) + 1)
        if num_blocks > self.block_pool.num_blocks:
            raise InvalidRequestError("prompt", f"needs {num_blocks} KV blocks; this worker has {self.block_pool.num_blocks}")
        # Running alone, the request must fit to its end, or preemption would recompute it forever.
        # Its last sampled token is never computed, hence the -1.
        num_blocks = self.kv_cache_manager.num_blocks_for(min(len(prompt_token_ids) + params.max_tokens, self.max_model_len) - 1)
        if num_blocks > self.block_pool.num_blocks:
            raise InvalidRequestError(
                "max_tokens", f"prompt and {params.max_tokens} new tokens need {num_blocks} KV blocks; this worker has {self.block_pool.num_blocks}"
            )
        bad = next((t for t in params.stop_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError("stop_token_ids", f"token id {bad} is outside the vocabulary")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, **options) -> Request:
        """Checks and queues a request; ``options`` as ``enqueue`` takes them."""
        self.validate(prompt_token_ids, params)
        return self.enqueue(request_id, prompt_token_ids, params, **options)

    def enqueue(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        remote_kv: RemoteKV | None = None,
        first_token: TokenLogprob | None = None,
        hold_kv: bool = False,
    ) -> Request:
        """Queues a request already ``validate``d (the services validate on their event loop,
        then enqueue on the engine thread): only the checks that depend on load are left.

        ``remote_kv`` and ``first_token``: the prompt was prefilled elsewhere; its KV
        will be loaded into local blocks and decoding starts from ``first_token``.
        ``hold_kv``: when the request finishes, keep its blocks until ``release``.
        """
        if request_id in self.scheduler.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        if len(self.scheduler.waiting) >= self.config.scheduler.max_waiting:
            raise QueueFullError(f"{len(self.scheduler.waiting)} requests are waiting; try again later")
        request = Request(request_id, list(prompt_token_ids), params, self.eos_token_ids)
        if first_token is not None:
            request.append_output(first_token.token_id, first_token if params.logprobs or params.top_logprobs else None)
        self.scheduler.add_request(request, remote_kv=remote_kv, hold_kv=hold_kv)
        return request

    def abort(self, request_id: str) -> bool:
        """Ends a request and frees its blocks; also releases held ones. False if unknown."""
        return self.scheduler.finish_request(request_id, FinishReason.ABORT) is not None

    release = abort

    def finish_kv_load(self, request_id: str, ok: bool, quarantine: frozenset[int] = frozenset()) -> None:
        self.scheduler.finish_kv_load(request_id, ok, quarantine)

    def free_quarantined(self, block_ids: list[int]) -> None:
        self.kv_cache_manager.free_quarantined(block_ids)

    def get_block_ids(self, request_id: str) -> list[int]:
        return self.kv_cache_manager.get_block_ids(request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- one step ------------------------------------------------------------

    def step(self) -> StepResult:
        out = self.scheduler.schedule()
        to_sample: list[Request] = []
        sampled: dict[str, tuple[int, TokenLogprob | None]] = {}
        if out.scheduled:
            logits = self.runner.execute(out)
            to_sample = [self.scheduler.requests[s.request_id] for s in out.scheduled if s.sample]
            sampled = dict(zip((r.request_id for r in to_sample), self.sampler(logits, to_sample)))
        self.scheduler.update_from_output(out, sampled)
        outputs = []
        for request in to_sample:
            token_id, logprob = sampled[request.request_id]
            outputs.append(
                RequestOutput(
                    request_id=request.request_id,
                    new_token_ids=[token_id],
                    new_logprobs=[logprob] if logprob is not None else [],
                    finish_reason=request.finish_reason if request.is_finished else None,
                    num_prompt_tokens=request.num_prompt_tokens,
                    num_cached_tokens=request.num_cached_tokens or 0,
                )
            )
        return StepResult(outputs, out.kv_loads)
