"""What the planner aims for in each pool: bounds, cooldowns, and targets on signals.

The chart renders ``planner.prefill`` / ``planner.decode`` from values.yaml into a YAML file
with the same camelCase keys; ``load_policies`` turns it into frozen ``PoolPolicy`` objects
and names the field when something is wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

POOLS = ("prefill", "decode")

# Config key -> signal name used by the decision logic.
SIGNALS = {
    "waitingPerReplica": "waiting_per_replica",
    "runningPerReplica": "running_per_replica",
    "kvCacheUtilization": "kv_cache_utilization",
    "ttftP90Seconds": "ttft_p90_seconds",
    "itlP90Seconds": "itl_p90_seconds",
}
# Latency percentiles have no value while a pool is idle (nothing finished in the window);
# that is a reason not to grow, and no reason not to shrink.
LATENCY_SIGNALS = frozenset({"ttft_p90_seconds", "itl_p90_seconds"})

_FIELDS = {
    "minReplicas": "min_replicas",
    "maxReplicas": "max_replicas",
    "scaleUpCooldownSeconds": "scale_up_cooldown_s",
    "scaleDownCooldownSeconds": "scale_down_cooldown_s",
    "scaleUpStabilizationSeconds": "scale_up_stabilization_s",
    "scaleDownStabilizationSeconds": "scale_down_stabilization_s",
    "smoothing": "smoothing",
}


class PolicyError(ValueError):
    """A planner policy value is wrong; the message names the field."""


@dataclass(frozen=True)
class Target:
    """Grow while the signal is above ``high``; shrinking needs it below ``low``."""

    signal: str
    high: float
    low: float


@dataclass(frozen=True)
class PoolPolicy:
    targets: tuple[Target, ...]
    min_replicas: int = 1
    max_replicas: int = 4
    scale_up_cooldown_s: float = 60.0
    scale_down_cooldown_s: float = 300.0
    scale_up_stabilization_s: float = 30.0
    scale_down_stabilization_s: float = 300.0
    smoothing: float = 0.5  # weight of the newest sample in the moving average

    def __post_init__(self) -> None:
        for name in ("min_replicas", "max_replicas"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PolicyError(f"{name} must be an integer >= 1, got {value!r}")
        if self.min_replicas > self.max_replicas:
            raise PolicyError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        for name in ("scale_up_cooldown_s", "scale_down_cooldown_s",
                     "scale_up_stabilization_s", "scale_down_stabilization_s"):
            if getattr(self, name) < 0:
                raise PolicyError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 < self.smoothing <= 1.0:
            raise PolicyError(f"smoothing must be in (0, 1], got {self.smoothing!r}")
        if not self.targets:
            raise PolicyError("targets: at least one target is needed")
        for t in self.targets:
            if t.signal not in SIGNALS.values():
                raise PolicyError(f"targets: unknown signal {t.signal!r}")
            if not t.low < t.high:
                raise PolicyError(f"targets.{t.signal}: low ({t.low}) must be below high ({t.high})")


DEFAULT_POLICIES = {
    "prefill": PoolPolicy(targets=(Target("waiting_per_replica", high=4.0, low=0.5),
                                   Target("ttft_p90_seconds", high=2.0, low=0.5))),
    "decode": PoolPolicy(targets=(Target("kv_cache_utilization", high=0.85, low=0.4),
                                  Target("itl_p90_seconds", high=0.1, low=0.04))),
}


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(f"{where} must be a number, got {value!r}")
    return float(value)


def pool_policy_from_dict(pool: str, raw: Mapping[str, Any]) -> PoolPolicy:
    unknown = set(raw) - set(_FIELDS) - {"targets"}
    if unknown:
        raise PolicyError(f"{pool}: unknown keys {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, field in _FIELDS.items():
        if key in raw:
            value = raw[key]
            kwargs[field] = value if field.endswith("replicas") else _number(f"{pool}.{key}", value)
    targets = []
    for key, bounds in (raw.get("targets") or {}).items():
        if key not in SIGNALS:
            raise PolicyError(f"{pool}.targets: unknown signal {key!r}, expected one of {sorted(SIGNALS)}")
        if not isinstance(bounds, Mapping) or set(bounds) != {"high", "low"}:
            raise PolicyError(f"{pool}.targets.{key} must have exactly 'high' and 'low'")
        targets.append(Target(SIGNALS[key], _number(f"{pool}.targets.{key}.high", bounds["high"]),
                              _number(f"{pool}.targets.{key}.low", bounds["low"])))
    try:
        return PoolPolicy(targets=tuple(targets), **kwargs)
    except PolicyError as e:
        raise PolicyError(f"{pool}: {e}") from None


def load_policies(source: str | Path | Mapping[str, Any] | None = None) -> dict[str, PoolPolicy]:
    """Policies for both pools from a YAML file or a mapping; pools left out get the defaults."""
    if source is None:
        return dict(DEFAULT_POLICIES)
    raw = source if isinstance(source, Mapping) else yaml.safe_load(Path(source).read_text()) or {}
    unknown = set(raw) - set(POOLS)
    if unknown:
        raise PolicyError(f"unknown pools {sorted(unknown)}, expected {list(POOLS)}")
    return {pool: pool_policy_from_dict(pool, raw[pool]) if pool in raw else DEFAULT_POLICIES[pool]
            for pool in POOLS}
