"""How long an engine step takes, as a function of what the step computes: the model the
router's placement and the simulator both price steps with.

The linear layers of a step are bound by reading the weights or by their matmuls,
whichever is slower (a roofline); attention runs in kernels of its own after them, so its
time adds:

  linear    = max(weight_ms + seq_ms * num_seqs, compute_base_ms + token_ms * num_tokens)
  attention = kv_ms_per_token * kv_tokens_read + pair_ms * attention_pairs
  step_ms   = linear + attention

``kv_tokens_read`` is the KV a step's attention reads (a decode row reads its whole
context); ``attention_pairs`` counts the (query, key) pairs of prefill chunks (more than
one new token), which grow with the square of a prompt; a decode row's attention is
memory-bound and priced by its KV read alone. Decode steps of realistic batches read the weights once (memory-bound), long
prefills are matmul-bound; a mixed step pays its prefill's matmuls and its decode rows' KV
reads one after the other. The coefficients are fitted
by non-negative least squares from a profile's measurements (``fit``), so every term means
what its name says and none can go negative.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


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
        linear = max(self.weight_ms + self.seq_ms * num_seqs, self.compute_base_ms + self.token_ms * num_tokens)
        return linear + self.kv_ms_per_token * kv_tokens_read + self.pair_ms * attention_pairs

    def decode_ms(self, batch: int, context: int) -> float:
        """A decode-only step of ``batch`` rows of ``context`` tokens each."""
        return self.step_ms(batch, batch, batch * context, 0)

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
    from scipy.optimize import nnls  # only when fitting: the router loads profiles without it

    coef, _ = nnls(np.asarray(rows, dtype=np.float64), np.asarray(targets, dtype=np.float64))
    return coef


def fit(decode: Sequence[tuple[int, int, float]], prefill: Sequence[tuple[int, int, float]]) -> StepModel:
    """Fits the model to measured steps: ``decode`` (batch, context, ms) and ``prefill``
    (new tokens, cached context, ms), at least one of each.

    The weights' read and the KV term are fitted to the decode steps (their linear layers
    are memory-bound). Only the prefill steps that this cannot explain (over 1.5x its
    prediction) are matmul-bound, so only those, less their KV reads, fit the compute
    side; with fewer than three of them the constant is dropped, with one the pair term
    too (the measured points cannot tell the terms apart)."""
    if not decode or not prefill:
        raise ValueError("a step model needs at least one decode and one prefill measurement")
    model = _fit_once(decode, prefill)
    # Large decode batches can be matmul-bound too: fit the weights' read again without them.
    memory_bound = [(b, c, ms) for b, c, ms in decode
                    if model.weight_ms + model.seq_ms * b >= model.compute_base_ms + model.token_ms * b]
    if memory_bound and len(memory_bound) < len(decode):
        model = _fit_once(memory_bound, prefill)
    return model


def _fit_once(decode: Sequence[tuple[int, int, float]], prefill: Sequence[tuple[int, int, float]]) -> StepModel:
    weight, seq, kv = _nnls([(1.0, b, b * c) for b, c, _ in decode], [ms for *_, ms in decode], 3)
    if len(decode) == 1:  # one point: all of it is the weights' read
        weight, seq, kv = decode[0][2], 0.0, 0.0
    memory = StepModel(weight, seq, kv, 0.0, 0.0, 0.0)
    bound = [(n, c, ms) for n, c, ms in prefill if ms > 1.5 * memory.prefill_ms(n, c)]
    if not bound:  # every prefill measured is memory-bound: compute never wins
        bound = [max(prefill, key=lambda p: p[0])]
    targets = [ms - kv * (c + n) for n, c, ms in bound]
    if len(bound) >= 3:
        base, tok, pair = _nnls([(1.0, n, causal_pairs(n, c)) for n, c, _ in bound], targets, 3)
    elif len(bound) == 2:
        tok, pair = _nnls([(n, causal_pairs(n, c)) for n, c, _ in bound], targets, 2)
        base = 0.0
    else:
        (n, c, _), = bound
        base, tok, pair = 0.0, max(targets[0], 0.0) / n, 0.0
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
