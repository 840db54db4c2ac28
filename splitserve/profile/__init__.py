"""Step-time and KV-transfer profiles of one device and model shape (``splitserve profile``)."""
from splitserve.profile.schema import SCHEMA, ModelShape, Profile
from splitserve.profile.step_model import StepModel, TransferModel, causal_pairs

__all__ = ["SCHEMA", "ModelShape", "Profile", "StepModel", "TransferModel", "causal_pairs"]
