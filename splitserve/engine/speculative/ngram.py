"""Prompt lookup: propose the tokens that followed the context's last n-gram where it occurred before.

No model: the proposal is what came after the most recent earlier occurrence of the context's
suffix, longest suffix first. Copy-heavy requests (editing, summarizing with quotes, code)
repeat long runs of their prompt, and each accepted run saves target steps.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, ngram_min: int = 1, ngram_max: int = 4) -> None:
        self.ngram_min, self.ngram_max = ngram_min, ngram_max

    def propose(self, token_ids: list[int], num_tokens: int) -> list[int]:
        """Up to ``num_tokens`` tokens that followed the longest suffix of ``token_ids`` (at most
        ``ngram_max`` long) seen earlier in it; [] when no suffix of ``ngram_min`` or more recurs."""
        if num_tokens <= 0 or len(token_ids) <= self.ngram_min:
            return []
        context = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.ngram_max, len(context) - 1), self.ngram_min - 1, -1):
            # Windows that start early enough to have a token after them, the suffix itself excluded.
            windows = sliding_window_view(context[:-1], n)
            hits = np.flatnonzero((windows == context[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # the most recent occurrence: nearest text is the likeliest copy
                return context[start : start + num_tokens].tolist()
        return []
