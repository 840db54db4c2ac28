"""One simulated worker: the engine's token-budget scheduler, stepped in simulated time.

Each step, as ``splitserve.engine.scheduler`` does: running requests first (one token
each when decoding, a chunk when still prefilling), then waiting ones join in arrival
order while the token budget, the sequence slots and the KV blocks last. The step's
duration comes from the profile's step model for exactly what it computes. A prefill
worker's requests leave once their prompt is computed (their first token sampled); a
decode worker's stay until their last token. KV that arrives from a prefill worker makes
a request join with its prompt already computed, as a pulled KV load does.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from splitserve.controlplane.types import WorkerLoad
from splitserve.profile.step_model import StepModel, causal_pairs


@dataclass(frozen=True)
class EngineLimits:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_blocks: int = 50_000
    block_size: int = 16
    prefix_caching: bool = True
    # Async scheduling composes step N+1 when step N starts, so a request that arrives
    # during step N can join step N+2 at the earliest (the GPU default).
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.num_blocks, self.block_size) < 1:
            raise ValueError(f"engine limits must be positive: {self}")


@dataclass(eq=False)
class Job:
    """One request on one worker. ``num_computed`` catches up to ``num_tokens``, the prompt
    plus the tokens generated so far (the last one not yet computed)."""

    request_id: int
    prompt_len: int
    target_tokens: int  # prompt + output tokens this worker must reach (prefill role: prompt + 1)
    num_computed: int = 0
    num_generated: int = 0  # tokens sampled here
    prefix_id: int | None = None
    prefix_len: int = 0
    eligible_step: int = 0  # the first step (by the worker's count) that may take it
    tracked: bool = False  # the router counts it against this worker
    prefill_only: bool = False  # its prompt only, for another worker to decode (a prefill or mixed-role worker)

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.num_generated

    def blocks(self, block_size: int) -> int:
        return -(-min(self.num_tokens + 1, self.target_tokens) // block_size)


@dataclass
class StepResult:
    duration_s: float
    sampled: list[Job]  # jobs that sampled a token at the end of this step
    finished: list[Job]  # jobs done on this worker (left it at the step's end)


@dataclass(eq=False)
class SimWorker:
    worker_id: str
    role: str  # "prefill" (prompts only) or "decode" (decodes, and prefills what it is sent)
    model: StepModel
    limits: EngineLimits = field(default_factory=EngineLimits)
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    cached_prefixes: set = field(default_factory=set)
    busy_until: float = 0.0
    stepping: bool = False
    composing: bool = False  # a step is about to be composed at this instant
    num_steps: int = 0

    def add(self, job: Job) -> None:
        if job.num_computed == 0 and self.limits.prefix_caching and job.prefix_id in self.cached_prefixes:
            # Whole blocks of the shared prefix hit the cache (and at least one token is computed).
            hit = job.prefix_len // self.limits.block_size * self.limits.block_size
            job.num_computed = min(hit, job.prompt_len - 1)
        # num_steps counts steps composed; while one runs, the next was composed with it.
        job.eligible_step = self.num_steps + (1 if self.stepping and self.limits.async_scheduling else 0)
        self.waiting.append(job)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def used_blocks(self) -> int:
        return sum(j.blocks(self.limits.block_size) for j in self.running)

    def queued_prefill_tokens(self) -> int:
        return sum(max(j.prompt_len - j.num_computed, 0) for j in (*self.waiting, *self.running))

    def load(self) -> WorkerLoad:
        """What this worker's heartbeat would report."""
        used = min(self.used_blocks(), self.limits.num_blocks)
        return WorkerLoad(len(self.waiting), len(self.running), self.queued_prefill_tokens(),
                          self.limits.num_blocks - used, self.limits.num_blocks)

    def step(self) -> StepResult | None:
        """Runs one step's worth of scheduling and prices it; None when there is nothing to do."""
        budget = self.limits.max_num_batched_tokens
        planned: list[tuple[Job, int]] = []
        for job in self.running:
            if budget <= 0:
                break
            n = min(job.prompt_len + job.num_generated - job.num_computed, budget)
            if n > 0:
                planned.append((job, n))
                budget -= n
        if self.waiting:  # counting blocks is the costly part of a step: only when admitting
            free_blocks = self.limits.num_blocks - self.used_blocks()
        while self.waiting and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            job = self.waiting[0]
            if job.eligible_step > self.num_steps:
                break  # arrived after this step was composed (async scheduling)
            need = job.blocks(self.limits.block_size)
            if need > free_blocks:
                break
            self.waiting.popleft()
            self.running.append(job)
            free_blocks -= need
            n = min(job.num_tokens - job.num_computed, budget)
            if n > 0:
                planned.append((job, n))
                budget -= n
        if not planned:
            if self.waiting and self.waiting[0].eligible_step > self.num_steps:
                # The step composed beside the last one was empty: nothing delays these.
                for job in self.waiting:
                    job.eligible_step = min(job.eligible_step, self.num_steps)
                return self.step()
            return None
        num_tokens = kv_read = pairs = 0
        for job, n in planned:
            num_tokens += n
            kv_read += job.num_computed + n
            if n > 1:  # a prefill chunk; decode rows are priced by their KV read alone
                pairs += causal_pairs(n, job.num_computed)
        duration = self.model.step_ms(num_tokens, len(planned), kv_read, pairs) / 1e3
        sampled, finished = [], []
        for job, n in planned:
            job.num_computed += n
            if job.num_computed < job.prompt_len + job.num_generated:
                continue  # a prefill chunk short of the prompt's end samples nothing
            if job.prefix_id is not None:
                self.cached_prefixes.add(job.prefix_id)
            job.num_generated += 1
            sampled.append(job)
            if job.prompt_len + job.num_generated >= job.target_tokens:
                finished.append(job)
        if finished:
            done = set(map(id, finished))
            self.running = [j for j in self.running if id(j) not in done]
        self.num_steps += 1
        return StepResult(duration, sampled, finished)
