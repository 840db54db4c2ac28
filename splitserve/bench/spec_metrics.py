"""Speculative decoding's acceptance, per decode worker, for each point of ``bench serve``.

The workers count proposals under vLLM's names (``vllm:spec_decode_num_drafts``,
``..._num_draft_tokens``, ``..._num_accepted_tokens``); a point's figures are the increments
of those counters between a scrape before the point and one after it. Acceptance rate is
accepted / proposed tokens; mean accepted length is the tokens a checking step yields per
request, 1 + accepted / drafts (vLLM's definition).
"""
from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

_NAMES = {
    "vllm:spec_decode_num_drafts": "num_drafts",
    "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
}


@dataclass(frozen=True)
class SpecCounts:
    num_drafts: float = 0.0
    num_draft_tokens: float = 0.0
    num_accepted_tokens: float = 0.0

    def __sub__(self, other: SpecCounts) -> SpecCounts:
        return SpecCounts(
            self.num_drafts - other.num_drafts,
            self.num_draft_tokens - other.num_draft_tokens,
            self.num_accepted_tokens - other.num_accepted_tokens,
        )

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None

    def as_dict(self) -> dict:
        return {
            "num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens, "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
        }


def parse(text: str) -> SpecCounts:
    """The counters' totals in a Prometheus text page (summed over label values; 0 when absent)."""
    values = dict.fromkeys(_NAMES.values(), 0.0)
    for family in text_string_to_metric_families(text):
        field = _NAMES.get(family.name)
        if field is not None:
            values[field] += sum(s.value for s in family.samples if s.name == family.name + "_total")
    return SpecCounts(**values)


def scrape(url: str, timeout: float = 10.0) -> SpecCounts:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse(response.read().decode())


def format_spec(counts: dict[str, SpecCounts]) -> str:
    lines = ["Speculative decoding (per decode worker):"]
    for url, c in counts.items():
        if not c.num_drafts:
            lines.append(f"  {url}: no proposals checked")
            continue
        lines.append(
            f"  {url}: acceptance rate {c.acceptance_rate:.3f}, mean accepted length {c.mean_accepted_length:.2f} "
            f"({int(c.num_accepted_tokens)}/{int(c.num_draft_tokens)} tokens over {int(c.num_drafts)} checks)"
        )
    return "\n".join(lines)
