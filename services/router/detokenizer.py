"""Incremental detokenization and stop strings for one request's output stream."""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


def backend_decode(tokenizer: PreTrainedTokenizerBase):
    """The tokenizer's own decode, or the Rust ``tokenizers`` one under it where that gives the
    same text (no clean-up of tokenization spaces): the wrapper converts its input element by
    element, 12% of the router's CPU under load on an H100 (detokenizing in all: 25%)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.clean_up_tokenization_spaces:
        return tokenizer.decode
    return backend.decode


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window of tokens (``prefix_offset``..end) rather than the whole
    output, and holds back text that ends in U+FFFD: a multi-byte character whose
    bytes are split across tokens is emitted once its last byte has arrived.
    Stop strings are matched on the text; text that could still become a stop
    string is held back until it cannot.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str], skip_special_tokens: bool, prompt_tail: list[int]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip_special_tokens = skip_special_tokens
        # A few prompt tokens give the first output tokens their leading-space context.
        self.token_ids: list[int] = list(prompt_tail)
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""  # all output text decoded so far
        self.emitted = 0  # characters of ``text`` already sent
        self.matched_stop: str | None = None
        self.matched_at: int | None = None  # see add()
        self._decode_ids = backend_decode(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: list[int]) -> str:
        """Takes new tokens; returns the text that may be sent now (possibly empty).

        When a stop string completes, the tokens after the one that completed it are not
        taken: ``matched_at`` then says how many of ``token_ids`` were (None otherwise).
        """
        self.matched_at = None
        released = []
        for i, token_id in enumerate(token_ids):
            self.token_ids.append(token_id)
            prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.token_ids[self.prefix_offset :])
            if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
                self.text += full[len(prefix) :]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
                if self.stop:  # a stop string may complete at any token: take none after it
                    released.append(self._releasable())
                    if self.matched_stop is not None:
                        self.matched_at = i + 1
                        break
        released.append(self._releasable())
        return "".join(released)

    def _releasable(self) -> str:
        if self.matched_stop is not None:
            return ""
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.emitted - len(stop) + 1))
            if at != -1:
                self.matched_stop = stop
                self.text = self.text[:at]
                break
        end = len(self.text)
        if self.matched_stop is None and self.stop:
            end -= self._partial_stop_len()
        delta = self.text[self.emitted : max(end, self.emitted)]
        self.emitted += len(delta)
        return delta

    def _partial_stop_len(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string.

        Only the places where a stop string's first character occurs can start one, found by
        str.find: per token this costs a few C-level searches, not a Python loop over every
        length of every stop string (the request checks bound their number and length)."""
        best, text = 0, self.text
        for stop in self.stop:
            at = text.find(stop[0], max(len(text) - len(stop) + 1, 0))
            while at != -1 and len(text) - at > best:
                if stop.startswith(text[at:]):
                    best = len(text) - at
                    break
                at = text.find(stop[0], at + 1)
        return best

    def flush(self) -> str:
        """At the end of the stream: whatever is held back and is not part of a stop string."""
        if self.matched_stop is None and self.read_offset < len(self.token_ids):
            # The output ends in an incomplete character: send its replacement character.
            prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
            self.text += self._decode(self.token_ids[self.prefix_offset :])[len(prefix) :]
            self.read_offset = len(self.token_ids)
        delta = self._releasable()
        if self.matched_stop is None:
            delta += self.text[self.emitted :]
            self.emitted = len(self.text)
        return delta
