"""How long an engine step takes, as a function of what the step computes: the model the
router's placement and the simulator both price steps with.

A step is bound by memory or by compute, whichever is slower (a roofline):

  memory  = weight_ms + seq_ms * num_seqs + kv_ms_per_token * kv_tokens_read
  compute = compute_base_ms + token_ms * num_tokens + pair_ms * attention_pairs
  step_ms = max(memory, compute)

``kv_tokens_read`` is the KV a step's attention reads (a decode row reads its whole
context); ``attention_pairs`` counts the (query, key) pairs of prefill chunks, which grow
with the square of the prompt. Decode steps of realistic batches are memory-bound (every
step reads all the weights once), long prefills compute-bound. The coefficients are fitted
by non-negative least squares from a profile's measurements (``fit``), so every term means
what its name says and none can go negative.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import nnls


def causal_pairs(num_new: int, context: int) -> int:
    """(query, key) pairs of ``num_new`` tokens appended after ``context`` cached ones."""
    return num_new * context + num_new * (num_new + 1) // 2


@dataclass(frozen=True)
class StepModel:
    weight_ms: float
    seq_ms: float
    kv_ms_per_token: float
    compute_base_ms: float
    token_ms: float
    pair_ms: float

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (value >= 0 and np.isfinite(value)):
                raise ValueError(f"step model coefficient {name} must be finite and >= 0, got {value}")

    def step_ms(self, num_tokens: int, num_seqs: int, kv_tokens_read: int, attention_pairs: int) -> float:
        memory = self.weight_ms + self.seq_ms * num_seqs + self.kv_ms_per_token * kv_tokens_read
        compute = self.compute_base_ms + self.token_ms * num_tokens + self.pair_ms * attention_pairs
        return max(memory, compute)

    def decode_ms(self, batch: int, context: int) -> float:
        """A decode-only step of ``batch`` rows of ``context`` tokens each."""
        return self.step_ms(batch, batch, batch * context, batch * context)

    def prefill_ms(self, num_new: int, context: int = 0) -> float:
        """One request's chunk of ``num_new`` tokens after ``context`` cached ones."""
        return self.step_ms(num_new, 1, context + num_new, causal_pairs(num_new, context))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> StepModel:
        return cls(**{k: float(data[k]) for k in cls.__dataclass_fields__})


def _nnls(rows: Sequence[Sequence[float]], targets: Sequence[float], num_features: int) -> np.ndarray:
    if not rows:
        return np.zeros(num_features)
    coef, _ = nnls(np.asarray(rows, dtype=np.float64), np.asarray(targets, dtype=np.float64))
    return coef


def fit(decode: Sequence[tuple[int, int, float]], prefill: Sequence[tuple[int, int, float]]) -> StepModel:
    """Fits the model to measured steps: ``decode`` (batch, context, ms) and ``prefill``
    (new tokens, cached context, ms), at least one of each.

    The memory side is fitted to the decode steps. Only the prefill steps that the memory
    side cannot explain (over 1.5x its prediction) are compute-bound, so only those fit the
    compute side; with fewer than three of them the constant is dropped, with one the
    pair term too (the measured points cannot tell the terms apart)."""
    if not decode or not prefill:
        raise ValueError("a step model needs at least one decode and one prefill measurement")
    weight, seq, kv = _nnls([(1.0, b, b * c) for b, c, _ in decode], [ms for *_, ms in decode], 3)
    if len(decode) == 1:  # one point: all of it is the weights' read
        weight, seq, kv = decode[0][2], 0.0, 0.0
    memory = StepModel(weight, seq, kv, 0.0, 0.0, 0.0)
    bound = [(n, c, ms) for n, c, ms in prefill if ms > 1.5 * memory.prefill_ms(n, c)]
    if not bound:  # every prefill measured is memory-bound: compute never wins
        bound = [max(prefill, key=lambda p: p[0])]
    if len(bound) >= 3:
        base, tok, pair = _nnls([(1.0, n, causal_pairs(n, c)) for n, c, _ in bound], [ms for *_, ms in bound], 3)
    elif len(bound) == 2:
        tok, pair = _nnls([(n, causal_pairs(n, c)) for n, c, _ in bound], [ms for *_, ms in bound], 2)
        base = 0.0
    else:
        (n, c, ms), = bound
        base, tok, pair = 0.0, ms / n, 0.0
    return StepModel(float(weight), float(seq), float(kv), float(base), float(tok), float(pair))


@dataclass(frozen=True)
class TransferModel:
    """KV transfer time = latency_ms + bytes / (gb_per_s * 1e9) seconds."""

    latency_ms: float
    gb_per_s: float

    def __post_init__(self) -> None:
        if not (self.latency_ms >= 0 and self.gb_per_s > 0):
            raise ValueError(f"transfer model needs latency_ms >= 0 and gb_per_s > 0, got {self}")

    def transfer_ms(self, num_bytes: int) -> float:
        return self.latency_ms + num_bytes / (self.gb_per_s * 1e9) * 1e3

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> TransferModel:
        return cls(float(data["latency_ms"]), float(data["gb_per_s"]))


def fit_transfer(points: Sequence[tuple[int, float]]) -> TransferModel:
    """(bytes, ms) measurements -> latency and bandwidth, by non-negative least squares."""
    if not points:
        raise ValueError("a transfer model needs at least one measurement")
    latency, ms_per_byte = _nnls([(1.0, b) for b, _ in points], [ms for _, ms in points], 2)
    if ms_per_byte <= 0:  # flat times: no size dependence seen; the largest sets the rate
        b, ms = max(points)
        ms_per_byte, latency = ms / b, 0.0
    return TransferModel(float(latency), float(1.0 / ms_per_byte / 1e6))
