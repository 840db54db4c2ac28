"""The profile file: what ``splitserve profile`` measured on one device for one model
shape, and the step and transfer models fitted to it. The router's placement and the
simulator read it; nothing else.

Schema ``splitserve.profile/1`` (one JSON object; times in milliseconds):

  schema        "splitserve.profile/1"
  source        "measured" (written by ``splitserve profile``) or "derived" (written by
                hand or a script from other recorded numbers; ``notes`` says how)
  device        what ran it, e.g. "NVIDIA H200" or "cpu"
  model         {"name", "num_layers", "num_kv_heads", "head_dim", "dtype",
                 "kv_bytes_per_token"}  (kv_bytes_per_token over all layers, K and V)
  tp_size       tensor-parallel size the steps were timed at
  block_size    tokens per KV block
  transport     how KV moved in the transfer measurements, e.g. "nixl-ucx DRAM"
  prefill       [{"tokens", "context", "ms"}]  one request: ``tokens`` new after ``context`` cached
  decode        [{"batch", "context", "ms"}]   a decode-only step, every row ``context`` long
  transfer      [{"bytes", "ms"}]              one READ of that many bytes of KV blocks
  step_model    StepModel's coefficients (see step_model.py)
  transfer_model {"latency_ms", "gb_per_s"}
  notes         free text: the command, what was derived and from what
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitserve.profile.step_model import StepModel, TransferModel, fit, fit_transfer

SCHEMA = "splitserve.profile/1"


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    kv_bytes_per_token: int


@dataclass(frozen=True)
class Profile:
    source: str
    device: str
    model: ModelShape
    tp_size: int
    block_size: int
    transport: str
    prefill: tuple[tuple[int, int, float], ...]  # (tokens, context, ms)
    decode: tuple[tuple[int, int, float], ...]  # (batch, context, ms)
    transfer: tuple[tuple[int, float], ...]  # (bytes, ms)
    step_model: StepModel
    transfer_model: TransferModel
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source not in ("measured", "derived"):
            raise ValueError(f"profile source must be measured or derived, got {self.source!r}")
        if self.tp_size < 1 or self.block_size < 1:
            raise ValueError("tp_size and block_size must be positive")

    @classmethod
    def fitted(cls, *, prefill, decode, transfer, **kwargs) -> Profile:
        """A measured profile with its models fitted to the measurements."""
        return cls(
            source="measured",
            prefill=tuple(prefill),
            decode=tuple(decode),
            transfer=tuple(transfer),
            step_model=fit(decode, prefill),
            transfer_model=fit_transfer(transfer),
            **kwargs,
        )

    def kv_bytes(self, num_tokens: int) -> int:
        """Bytes of KV moved for a prompt: whole blocks, as the transfer moves them."""
        blocks = -(-num_tokens // self.block_size)
        return blocks * self.block_size * self.model.kv_bytes_per_token

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "source": self.source,
            "device": self.device,
            "model": vars(self.model).copy(),
            "tp_size": self.tp_size,
            "block_size": self.block_size,
            "transport": self.transport,
            "prefill": [{"tokens": n, "context": c, "ms": ms} for n, c, ms in self.prefill],
            "decode": [{"batch": b, "context": c, "ms": ms} for b, c, ms in self.decode],
            "transfer": [{"bytes": b, "ms": ms} for b, ms in self.transfer],
            "step_model": self.step_model.to_dict(),
            "transfer_model": self.transfer_model.to_dict(),
            "notes": self.notes,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} profile (schema {data.get('schema')!r})")
        try:
            return cls(
                source=data["source"],
                device=data["device"],
                model=ModelShape(**data["model"]),
                tp_size=int(data["tp_size"]),
                block_size=int(data["block_size"]),
                transport=data["transport"],
                prefill=tuple((int(p["tokens"]), int(p["context"]), float(p["ms"])) for p in data["prefill"]),
                decode=tuple((int(p["batch"]), int(p["context"]), float(p["ms"])) for p in data["decode"]),
                transfer=tuple((int(p["bytes"]), float(p["ms"])) for p in data["transfer"]),
                step_model=StepModel.from_dict(data["step_model"]),
                transfer_model=TransferModel.from_dict(data["transfer_model"]),
                notes=data.get("notes", ""),
                extra=data.get("extra", {}),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed profile: {type(e).__name__}: {e}") from None

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Profile:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        return cls.from_dict(data)
