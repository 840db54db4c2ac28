"""Speculative decoding: proposers (prompt lookup, a draft model) and the exact check of their tokens."""
from splitserve.engine.speculative.decoder import SpecStats, SpeculativeDecoder

__all__ = ["SpecStats", "SpeculativeDecoder"]
