"""Checking proposed tokens against the target model, keeping the target's distribution exactly.

Every proposal here is deterministic given its context (prompt lookup, a draft's argmax), so
the draft distribution q is a point mass on the proposed token d and the standard rule
(accept d with probability min(1, p(d)/q(d)), else draw from max(p - q, 0) normalized)
becomes: accept d with probability p(d); on rejection draw from p with d removed. Then
P(d) = p(d) and P(x) = (1 - p(d)) p(x) / (1 - p(d)) = p(x) for x != d: the output is
distributed as p whatever was proposed. A greedy row accepts d iff d is the argmax, and
emits the argmax otherwise, so greedy output is token for token the target's.

p is the distribution the sampler would draw from (temperature, top-k, top-p, min-p applied),
so a step with proposals samples what a step without them would.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from splitserve.engine.request import Request
from splitserve.engine.sampler import truncate_rows
from splitserve.kernels.attention_metadata import to_device


@dataclass(frozen=True)
class Verified:
    """One request's outcome: the proposed tokens it kept, then the token the target drew."""

    num_proposed: int
    num_accepted: int
    token_ids: list[int]  # num_accepted proposed tokens + one drawn by the target


def target_probs(logits: torch.Tensor, params) -> torch.Tensor:
    """The sampler's distribution for sampled rows: ``logits`` [rows, vocab], ``params`` one
    SamplingParams per row (none greedy). Float32 probabilities [rows, vocab]."""
    limits = to_device([[p.temperature, p.top_k, p.top_p, p.min_p] for p in params], torch.float32, logits.device)
    scaled = logits.float() / limits[:, 0:1]
    if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
        scaled = truncate_rows(scaled, limits[:, 1].long(), limits[:, 2], limits[:, 3])
    return scaled.softmax(-1)


def accept_or_resample(
    probs: torch.Tensor, proposed: torch.Tensor, has_proposal: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row: whether the proposed token is accepted, and the token drawn if it is not (for
    a row without a proposal, the bonus row, a plain draw from p). ``probs`` [rows, vocab];
    ``proposed`` [rows] (any id where ``has_proposal`` is False)."""
    u = torch.rand(probs.shape[0], device=probs.device, generator=generator)
    picked = probs.gather(1, proposed.unsqueeze(1)).squeeze(1)
    accepted = has_proposal & (u < picked)
    residual = probs.scatter(1, proposed.unsqueeze(1), 0.0)
    residual = torch.where(has_proposal.unsqueeze(1), residual, probs)
    # Exponential race: argmax of w / E, E ~ Exp(1), picks i with chance w_i / sum(w); w need not sum to 1.
    noise = torch.empty_like(residual).exponential_(generator=generator)
    return accepted, (residual / noise).argmax(dim=-1)


def verify(
    logits: torch.Tensor, requests: Sequence[Request], proposals: Sequence[list[int]], generator: torch.Generator | None
) -> list[Verified]:
    """``logits`` [sum(1 + len(p) for p in proposals), vocab]: for each request, the rows after
    its newest token and after each proposed token, in order. One host read for the batch."""
    device = logits.device
    sizes = [1 + len(p) for p in proposals]
    if logits.shape[0] != sum(sizes):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(proposals)} requests proposing {sum(sizes) - len(sizes)} tokens")
    proposed_rows = [t for p in proposals for t in [*p, 0]]  # the bonus row proposes nothing
    has_rows = [flag for p in proposals for flag in [*([True] * len(p)), False]]
    proposed = to_device(proposed_rows, torch.long, device)
    has_proposal = to_device(has_rows, torch.bool, device)
    argmax = logits.argmax(dim=-1)
    accepted = argmax == proposed  # greedy rows; sampled rows are replaced below
    drawn = argmax
    sampled = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
    if sampled:
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        rows = [row for i in sampled for row in range(starts[i], starts[i + 1])]
        params = [requests[i].sampling_params for i in sampled for _ in range(sizes[i])]
        index = to_device(rows, torch.long, device)
        ok, draw = accept_or_resample(
            target_probs(logits.index_select(0, index), params), proposed[index], has_proposal[index], generator
        )
        accepted = accepted.index_copy(0, index, ok)
        drawn = drawn.index_copy(0, index, draw)
    accepted &= has_proposal
    host = torch.stack([accepted.long(), drawn]).tolist()  # the one wait
    results, row = [], 0
    for p, n in zip(proposals, sizes):
        num_accepted = 0
        while num_accepted < len(p) and host[0][row + num_accepted]:
            num_accepted += 1
        results.append(Verified(len(p), num_accepted, [*p[:num_accepted], host[1][row + num_accepted]]))
        row += n
    return results
