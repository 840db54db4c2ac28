"""Prompt lookup: propose the tokens that followed the context's last n-gram where it occurred before.

No model: the proposal is what came after the most recent earlier occurrence of the context's
suffix, longest suffix first. Copy-heavy requests (editing, summarizing with quotes, code)
repeat long runs of their prompt, and each accepted run saves target steps.
"""
from __future__ import annotations

import numpy as np


class NgramProposer:
    def __init__(self, ngram_min: int = 1, ngram_max: int = 4) -> None:
        self.ngram_min, self.ngram_max = ngram_min, ngram_max

    def propose(self, token_ids: list[int], num_tokens: int) -> list[int]:
        """Up to ``num_tokens`` tokens that followed the longest suffix of ``token_ids`` (at most
        ``ngram_max`` long) seen earlier in it; [] when no suffix of ``ngram_min`` or more recurs."""
        if num_tokens <= 0 or len(token_ids) <= self.ngram_min:
            return []
        context = np.asarray(token_ids, dtype=np.int64)
        last = len(context) - 1
        # One pass over the context: earlier positions holding the newest token end a 1-gram match;
        # each is then extended backwards while it keeps matching, up to ngram_max.
        ends = np.flatnonzero(context[:-1] == context[last])
        if ends.size == 0:
            return []
        length = np.ones_like(ends)
        for k in range(1, min(self.ngram_max, last)):
            extend = (length == k) & (ends >= k) & (context[np.maximum(ends - k, 0)] == context[last - k])
            if not extend.any():
                break
            length[extend] += 1
        longest = int(length.max())
        if longest < self.ngram_min:
            return []
        start = int(ends[np.flatnonzero(length == longest)[-1]]) + 1  # the most recent: nearest text is the likeliest copy
        return context[start : start + num_tokens].tolist()
