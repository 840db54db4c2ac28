"""Turns the last-position logits of a batch into next tokens, per request's SamplingParams.

Logprobs are those of the model's raw distribution (log_softmax of the logits
before penalties and temperature), as vLLM and the OpenAI API report them.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from splitserve.engine.request import Request, TokenLogprob
from splitserve.kernels.attention_metadata import to_device


def apply_penalties(logits: torch.Tensor, request: Request) -> torch.Tensor:
    """Repetition penalty over prompt and output (as transformers applies it); presence and
    frequency penalties over the output (as the OpenAI API defines them). ``logits``: [vocab]."""
    params = request.sampling_params
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(request.all_token_ids)), dtype=torch.long, device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and request.output_token_ids:
        out = torch.tensor(request.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_logit_bias(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Adds each request's logit_bias to its row; a copy when any has one. ``logits``: [rows, vocab]."""
    rows, ids, values = [], [], []
    for i, request in enumerate(requests):
        for token_id, bias in request.sampling_params.logit_bias:
            rows.append(i)
            ids.append(token_id)
            values.append(bias)
    if not rows:
        return logits
    logits = logits.clone()
    logits.index_put_((torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)),
                      torch.tensor(values, dtype=logits.dtype, device=logits.device), accumulate=True)
    return logits


def truncate_rows(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Masks, row by row, tokens outside top-k (ties with the k-th kept), the top-p nucleus (a
    token stays while the mass before it is below top_p; the most likely always stays) and the
    min-p floor, applied in that order, with one sort for all rows. ``logits``: [rows, vocab]
    float; the limits: [rows] on the same device (top_k 0: none)."""
    vocab = logits.shape[-1]
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = ordered.gather(1, (k - 1).unsqueeze(1))
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))  # ties with the k-th stay
    probs = ordered.softmax(-1)
    # The most likely token always stays; a row with top_p 1 drops nothing (its cumsum may round past 1).
    drop = ((probs.cumsum(-1) - probs) >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    drop |= ordered == float("-inf")
    logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p.unsqueeze(1) * probs.amax(-1, keepdim=True), float("-inf"))


class Sampler:
    """Samples one token per request. The engine's own generators serve requests without a seed:
    one on the host (per-request sampling) and one per device (batched sampling)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self._device_generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[tuple[int, TokenLogprob | None]]:
        """``logits``: [num_requests, vocab], any device and dtype."""
        if self.samples_on_device(requests):
            return [(token_id, None) for token_id in self.sample_on_device(logits, requests).tolist()]
        logits = logits.float()
        want_logprobs = any(r.sampling_params.logprobs or r.sampling_params.top_logprobs for r in requests)
        logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        logits = apply_logit_bias(logits, requests)  # after the logprobs: they report the model's own distribution
        if all(r.sampling_params.greedy and not r.sampling_params.has_penalties for r in requests):
            token_ids = logits.argmax(dim=-1).tolist()
        else:
            token_ids = [self._sample_one(logits[i].clone(), r) for i, r in enumerate(requests)]
        results = []
        for i, (token_id, request) in enumerate(zip(token_ids, requests)):
            params = request.sampling_params
            if logprobs is None or not (params.logprobs or params.top_logprobs):
                results.append((token_id, None))
                continue
            row = logprobs[i]
            top: tuple[tuple[int, float], ...] = ()
            if params.top_logprobs:
                values, ids = torch.topk(row, params.top_logprobs)
                top = tuple(zip(ids.tolist(), values.tolist()))
            results.append((token_id, TokenLogprob(token_id, row[token_id].item(), top)))
        return results

    @staticmethod
    def samples_on_device(requests: Sequence[Request]) -> bool:
        """Whether ``sample_on_device`` serves every one of ``requests``: greedy or unseeded
        sampling, without penalties (they need each request's history) or logprobs to report."""
        return all(
            (p.greedy or p.seed is None) and not p.has_penalties and not (p.logprobs or p.top_logprobs) and not p.logit_bias
            for p in (r.sampling_params for r in requests)
        )

    def sample_on_device(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """Token ids [num_requests] on the logits' device, queued there: nothing waits. Sampled
        rows draw by the exponential race (argmax of p / E, E ~ Exp(1), picks i with chance p_i)."""
        tokens = logits.argmax(dim=-1)
        rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if not rows:
            return tokens
        params = [requests[i].sampling_params for i in rows]
        device = logits.device
        index = to_device(rows, torch.long, device)
        limits = to_device([[p.temperature, p.top_k, p.top_p, p.min_p] for p in params], torch.float32, device)
        scaled = logits.index_select(0, index).float() / limits[:, 0:1]
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
            scaled = truncate_rows(scaled, limits[:, 1].long(), limits[:, 2], limits[:, 3])
        probs = scaled.softmax(-1)
        noise = torch.empty_like(probs).exponential_(generator=self._device_generator(device))
        return tokens.index_copy(0, index, (probs / noise).argmax(dim=-1))

    def device_generator(self, device: torch.device) -> torch.Generator:
        """The generator of unseeded draws on ``device`` (speculative decoding draws with it too)."""
        return self._device_generator(device)

    def _device_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._device_generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._device_generators[device] = generator
        return self._device_generators[device]

    def _sample_one(self, logits: torch.Tensor, request: Request) -> int:
        params = request.sampling_params
        logits = apply_penalties(logits, request)
        if params.greedy:
            return int(logits.argmax())
        logits = logits / params.temperature
        if params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0:
            limits = torch.tensor([[params.top_k, params.top_p, params.min_p]], device=logits.device)
            logits = truncate_rows(logits.unsqueeze(0), limits[:, 0].long(), limits[:, 1], limits[:, 2])[0]
        probs = logits.softmax(-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self._generator_for(request)))

    def _generator_for(self, request: Request) -> torch.Generator:
        """A seeded request draws from a generator keyed by (seed, output position), not by
        history: the same seed gives the same tokens whether the request ran on one engine,
        was preempted and recomputed, or had its first token sampled on a prefill worker."""
        seed = request.sampling_params.seed
        if seed is None:
            return self.generator
        key = hashlib.blake2b(f"{seed}:{request.num_output_tokens}".encode(), digest_size=8).digest()
        generator = torch.Generator()
        generator.manual_seed(int.from_bytes(key, "little") & (2**63 - 1))
        return generator
