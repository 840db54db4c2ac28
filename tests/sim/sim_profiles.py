"""Profiles with exact, hand-chosen step and transfer times, for the simulator's tests."""
from __future__ import annotations

from splitserve.profile.schema import ModelShape, Profile
from splitserve.profile.step_model import StepModel, TransferModel

SHAPE = ModelShape("test", num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32", kv_bytes_per_token=1000)


def make_profile(step: StepModel, transfer: TransferModel = TransferModel(0.0, 1e6), block_size: int = 16) -> Profile:
    """A profile whose step and transfer times are exactly the given models' (hand-computed tests)."""
    return Profile(source="derived", device="test", model=SHAPE, tp_size=1, block_size=block_size, transport="test",
                   prefill=(), decode=(), transfer=(), step_model=step, transfer_model=transfer)


def constant(ms: float) -> StepModel:
    """Every step takes ``ms``, whatever it computes."""
    return StepModel(ms, 0.0, 0.0, 0.0, 0.0, 0.0)
