"""Scales the prefill and decode pools on their own metrics through the Kubernetes API.

``decision`` is the pure part (samples in, desired replicas out); ``metrics`` and
``sources`` produce samples; ``kube`` reads and patches the Deployments; ``loop`` and
``cli`` put them together as ``python -m splitserve.planner``.
"""
from splitserve.planner.cli import run_planner
from splitserve.planner.decision import Decision, Planner, PoolSample
from splitserve.planner.policy import DEFAULT_POLICIES, PolicyError, PoolPolicy, Target, load_policies

__all__ = ["DEFAULT_POLICIES", "Decision", "Planner", "PolicyError", "PoolPolicy", "PoolSample", "Target",
           "load_policies", "run_planner"]
