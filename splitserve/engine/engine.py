"""The engine: validates requests, and each step schedules, runs the model and samples.

Single-threaded on purpose; services run ``step()`` in a thread of their own and talk to it
through queues. With async scheduling a step queues its model run and sampling on the device
and returns the outputs of the step before it, so the host's work for the next step (reading
back tokens, stop checks, outputs, scheduling, inputs) runs while the device computes. A
request's newest token is then a placeholder in the scheduler's eyes: the next step computes
it from the device copy (``Placeholders``), and a request that turns out to have stopped had
one row computed for nothing, discarded.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace

import torch

from splitserve.config import EngineConfig
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.errors import InvalidRequestError, QueueFullError
from splitserve.engine.grammar import GrammarCompiler, GrammarMatchers
from splitserve.engine.host_tier import make_host_tier
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.model_runner import ModelRunner, Placeholders
from splitserve.engine.request import PLACEHOLDER, FinishReason, Request, TokenLogprob
from splitserve.engine.sampler import Sampler
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import KVLoad, RemoteKV, Scheduler, SchedulerOutput
from splitserve.engine.speculative import SpeculativeDecoder
from splitserve.engine.stats import EngineStats, RequestClock, RequestTimes
from splitserve.engine.tiered_kv_cache import TieredKVCacheManager


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # with the first token, when asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StepResult:
    outputs: list[RequestOutput]
    kv_loads: list[KVLoad]  # transfers the caller must run, then report with finish_kv_load


@dataclass(frozen=True)
class _InFlight:
    """A step queued on the device whose sampled tokens have not been read back."""

    requests: list[Request]  # the sampled rows, in order
    tokens: torch.Tensor  # [len(requests)] on the device: the next step's placeholders read it
    host: torch.Tensor  # the same, copying to host memory without blocking
    copied: torch.cuda.Event | None  # None on the CPU: nothing is asynchronous there


class LLMEngine:
    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None) -> None:
        self.config = config
        self.runner = runner or ModelRunner(config.model, config.cache)
        self.block_size = config.cache.block_size
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.arch.vocab_size
        self.eos_token_ids = self.runner.arch.eos_token_ids
        self.block_pool = BlockPool(self.runner.num_blocks, config.cache.enable_prefix_caching)
        self.host_tier = make_host_tier(config.cache, self.runner, config.parallel.tensor_parallel_size)
        self.kv_cache_manager = (
            KVCacheManager(self.block_pool, self.block_size)
            if self.host_tier is None
            else TieredKVCacheManager(self.block_pool, self.block_size, self.host_tier)
        )
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager, self.max_model_len)
        self.sampler = Sampler()
        wanted = config.scheduler.async_scheduling
        self.async_scheduling = wanted if wanted is not None else self.runner.device.type == "cuda"
        # Speculative steps are synchronous: the next proposals need this step's accepted tokens.
        self.speculative = (
            SpeculativeDecoder(config.speculative, self.runner, self.kv_cache_manager) if config.speculative.method else None
        )
        self._in_flight: _InFlight | None = None
        self.num_discarded_rows = 0  # rows computed for requests that had stopped (async scheduling)
        self.num_host_sampled_steps = 0  # async scheduling: steps that waited to sample on the host
        self.num_generation_tokens = 0
        self.num_prefix_queried_tokens = 0
        self._clock = RequestClock()
        self._grammars: GrammarMatchers | None = None  # built with the first constrained request
        self._grammars_lock = threading.Lock()  # compile_constraint runs on the services' worker threads

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
        bad = next((t for t, _ in params.logit_bias if t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError("logit_bias", f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if params.constraint is not None:
            if self.speculative is not None:  # its proposals and acceptance do not consult the grammar
                raise InvalidRequestError(params.constraint.field, "is not supported by a worker running speculative decoding")
            self.grammars.compiler.compile(params.constraint)  # cached: enqueue finds it compiled

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
        if params.constraint is not None:
            self.grammars.matcher(request)  # a first token outside the grammar is refused here, not mid-step
        self.scheduler.add_request(request, remote_kv=remote_kv, hold_kv=hold_kv)
        self._clock.queued(request_id)
        return request

    def abort(self, request_id: str) -> bool:
        """Ends a request and frees its blocks; also releases held ones. False if unknown."""
        self._clock.forget([request_id])
        return self.scheduler.finish_request(request_id, FinishReason.ABORT) is not None

    release = abort

    def finish_kv_load(self, request_id: str, ok: bool, quarantine: frozenset[int] = frozenset()) -> None:
        self.scheduler.finish_kv_load(request_id, ok, quarantine)

    def free_quarantined(self, block_ids: list[int]) -> None:
        self.kv_cache_manager.free_quarantined(block_ids)

    def get_block_ids(self, request_id: str) -> list[int]:
        return self.kv_cache_manager.get_block_ids(request_id)

    @property
    def grammars(self) -> GrammarMatchers:
        """The constrained requests' matchers (the checkpoint's tokenizer is loaded on first use)."""
        with self._grammars_lock:
            if self._grammars is None:
                from splitserve.tokenizer import load_tokenizer

                tokenizer = load_tokenizer(self.config.model.model_dir)
                # On a CPU device the model's own threads hold the cores: fill masks on one thread.
                threads = 1 if self.runner.device.type == "cpu" else 4
                self._grammars = GrammarMatchers(GrammarCompiler(tokenizer, self.vocab_size, self.eos_token_ids), threads)
            return self._grammars

    def compile_constraint(self, params: SamplingParams) -> None:
        """Compiles the request's constraint into the compiler's cache (``validate`` then finds
        it there); raises InvalidRequestError naming it. Safe on any thread: the services run
        it on a worker thread, so a grammar's compile time never holds their event loop."""
        if params.constraint is not None:
            self.grammars.compiler.compile(params.constraint)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._in_flight is not None

    # -- one step ------------------------------------------------------------

    def step(self) -> StepResult:
        if self.speculative is not None:
            result = self._step_speculative()
        else:
            result = self._step_async() if self.async_scheduling else self._step_sync()
        self._record(result.outputs)
        return result

    def _schedule(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        if self.host_tier is not None:  # spills and restores, queued ahead of the step
            self.host_tier.flush(self.runner.kv_cache)
        # A request leaves the queue when first scheduled: to compute, or to load its KV from elsewhere.
        unscheduled = self._clock.unscheduled
        if unscheduled:
            now = time.monotonic()
            for request_id in [s.request_id for s in out.scheduled] + [load.request_id for load in out.kv_loads]:
                if request_id in unscheduled:
                    self._clock.scheduled(request_id, now)
                    if self.config.cache.enable_prefix_caching:
                        self.num_prefix_queried_tokens += self.scheduler.requests[request_id].num_prompt_tokens
        return out

    def _step_async(self) -> StepResult:
        out = self._schedule()
        previous, self._in_flight = self._in_flight, None
        to_sample = [self.scheduler.requests[s.request_id] for s in out.scheduled if s.sample]
        logits = self.runner.execute(out, self._placeholders(out, previous)) if out.scheduled else None
        if logits is not None:
            logits = self._prompt_logprobs(out, logits)
        # The device now has this step queued behind the previous one; read the previous one back.
        outputs = self._read_back(previous) if previous is not None else []
        if logits is None:
            return StepResult(outputs, out.kv_loads)
        # A request that stopped on the token just read back had this step's row computed for nothing.
        self.num_discarded_rows += sum(r.is_finished for r in to_sample)
        logits = self._constrain(logits, to_sample)  # the tokens just read back advanced the matchers
        if self.sampler.samples_on_device(to_sample):
            tokens = self.sampler.sample_on_device(logits, to_sample)
            self.scheduler.advance(out)
            for request in to_sample:
                if not request.is_finished:
                    request.append_placeholder()
            self._in_flight = self._queue_copy(to_sample, tokens)
        else:  # a request needs the host (penalties, logprobs, a seed): this step is synchronous
            self.num_host_sampled_steps += 1
            sampled = {
                r.request_id: result for r, result in zip(to_sample, self.sampler(logits, to_sample)) if not r.is_finished
            }
            self._accept(to_sample, sampled)
            self.scheduler.update_from_output(out, sampled)
            outputs += [self._output(r, *sampled[r.request_id]) for r in to_sample if r.request_id in sampled]
        return StepResult(outputs, out.kv_loads)

    def _step_sync(self) -> StepResult:
        out = self._schedule()
        to_sample: list[Request] = []
        sampled: dict[str, tuple[int, TokenLogprob | None]] = {}
        if out.scheduled:
            logits = self._prompt_logprobs(out, self.runner.execute(out))
            to_sample = [self.scheduler.requests[s.request_id] for s in out.scheduled if s.sample]
            logits = self._constrain(logits, to_sample)
            sampled = dict(zip((r.request_id for r in to_sample), self.sampler(logits, to_sample)))
            self._accept(to_sample, sampled)
        self.scheduler.update_from_output(out, sampled)
        return StepResult([self._output(r, *sampled[r.request_id]) for r in to_sample], out.kv_loads)

    def _step_speculative(self) -> StepResult:
        self.speculative.propose(self.scheduler)
        out = self._schedule()
        if not out.scheduled:
            return StepResult([], out.kv_loads)
        logits = self._prompt_logprobs(out, self.runner.execute(out))
        outputs = []
        for request, token_ids, logprobs in self.speculative.sample(self.scheduler, out, logits, self.sampler):
            outputs.append(replace(self._output(request, token_ids[-1], None), new_token_ids=token_ids, new_logprobs=logprobs))
        return StepResult(outputs, out.kv_loads)

    # -- stats -----------------------------------------------------------------

    def stats(self) -> EngineStats:
        """A snapshot: queue lengths, KV blocks, and counters since the engine started."""
        s, pool = self.scheduler, self.block_pool
        return EngineStats(
            num_waiting=len(s.waiting),
            num_running=len(s.running),
            num_loading=len(s.loading),
            num_held=len(s.held),
            num_total_blocks=pool.num_blocks,
            num_free_blocks=pool.num_free_blocks,
            num_pinned_blocks=sum(len(self.get_block_ids(r)) for r in list(s.held)),
            num_prompt_tokens_computed=s.num_prompt_tokens_computed,
            num_prefix_queried_tokens=self.num_prefix_queried_tokens,
            num_prefix_hit_tokens=s.num_prefix_hit_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_preemptions=s.num_preemptions,
            num_discarded_rows=self.num_discarded_rows,
            num_tokens_in_flight=sum(r.num_tokens - r.num_computed_tokens for r in [*s.waiting, *s.running]),
            spec=self.speculative.stats if self.speculative is not None else None,
        )

    def drain_request_times(self) -> list[RequestTimes]:
        """The intervals of the requests finished since the last call (aborted ones excluded)."""
        return self._clock.drain()

    def _record(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self.num_generation_tokens += len(out.new_token_ids)
            self._clock.token(out.request_id, out.finish_reason.value if out.finish_reason is not None else None)
        if len(self._clock) > len(self.scheduler.requests) - len(self.scheduler.held):  # some ended without an output
            self._clock.forget([r for r in self._clock.known() if r not in self.scheduler.requests])

    def _constrain(self, logits: torch.Tensor, to_sample: list[Request]) -> torch.Tensor:
        """Masks the rows of constrained requests to their grammar (``grammar.GrammarMatchers``)."""
        if not any(r.sampling_params.constraint is not None for r in to_sample):
            return logits
        return self.grammars.constrain(logits, to_sample)

    def _accept(self, to_sample: list[Request], sampled: dict[str, tuple[int, TokenLogprob | None]]) -> None:
        for request in to_sample:
            if request.sampling_params.constraint is not None and request.request_id in sampled:
                self.grammars.accept(request, sampled[request.request_id][0])

    @staticmethod
    def _placeholders(out: SchedulerOutput, previous: _InFlight | None) -> Placeholders | None:
        if previous is None:
            return None
        row_of = {r.request_id: i for i, r in enumerate(previous.requests) if r.num_pending_tokens}
        rows = [row_of[s.request_id] if s.token_ids[-1] == PLACEHOLDER else -1 for s in out.scheduled]
        return Placeholders(previous.tokens, rows) if any(row >= 0 for row in rows) else None

    def _queue_copy(self, requests: list[Request], tokens: torch.Tensor) -> _InFlight:
        if tokens.device.type != "cuda":
            return _InFlight(requests, tokens, tokens, None)
        host = tokens.to("cpu", non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return _InFlight(requests, tokens, host, copied)

    def _read_back(self, step: _InFlight) -> list[RequestOutput]:
        """Waits for ``step``'s tokens, puts them in place of the placeholders, checks for stops."""
        if step.copied is not None:
            step.copied.synchronize()
        outputs = []
        for request, token_id in zip(step.requests, step.host.tolist()):
            if request.is_finished or not request.num_pending_tokens:
                continue  # aborted, or stopped by the token before, while this one was computed
            request.resolve_placeholder(token_id)
            if request.sampling_params.constraint is not None:
                self.grammars.accept(request, token_id)
            self.scheduler.check_finished(request)
            outputs.append(self._output(request, token_id, None))
        return outputs

    def _prompt_logprobs(self, out: SchedulerOutput, logits: torch.Tensor) -> torch.Tensor:
        """Takes the prompt logprobs of the requests that asked for them from their rows (all of
        their step's tokens: row j predicts the token after position start_pos + j); returns the
        rows to sample from, one per sampling request. Reads the device: such steps wait."""
        if not any(s.all_rows for s in out.scheduled):
            return logits
        sample_rows, row = [], 0
        for s in out.scheduled:
            if not s.all_rows:
                num_rows = (1 + s.num_spec) if s.sample else 0  # the proposed tokens' rows too
                sample_rows += range(row, row + num_rows)
                row += num_rows
                continue
            request = self.scheduler.requests[s.request_id]
            k = request.sampling_params.prompt_logprobs
            prompt = request.prompt_token_ids
            num = min(len(s.token_ids), len(prompt) - 1 - s.start_pos)  # rows whose next token is a prompt token
            logprobs = torch.log_softmax(logits[row : row + num].float(), dim=-1)
            targets = torch.tensor(prompt[s.start_pos + 1 : s.start_pos + 1 + num], device=logprobs.device)
            picked = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
            tops = torch.topk(logprobs, k) if k else None
            for j, token_id in enumerate(targets.tolist()):
                if s.start_pos + j < len(request.prompt_logprobs):
                    continue  # recomputed after a preemption: taken the first time
                top = tuple(zip(tops.indices[j].tolist(), tops.values[j].tolist())) if tops is not None else ()
                request.prompt_logprobs.append(TokenLogprob(token_id, picked[j], top))
            row += len(s.token_ids)
            if s.sample:
                sample_rows.append(row - 1)
        return logits[torch.tensor(sample_rows, dtype=torch.long, device=logits.device)]

    @staticmethod
    def _output(request: Request, token_id: int, logprob: TokenLogprob | None) -> RequestOutput:
        first = request.num_output_tokens == 1 and request.sampling_params.prompt_logprobs is not None
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[token_id],
            new_logprobs=[logprob] if logprob is not None else [],
            finish_reason=request.finish_reason if request.is_finished else None,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens or 0,
            prompt_logprobs=list(request.prompt_logprobs) if first else [],
        )
