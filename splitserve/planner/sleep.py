"""Scaling a pool by sleep and wake before pods: a woken worker serves in seconds, a new pod in minutes.

``SleepFirstScaler`` wraps a pool's DeploymentScaler. The replicas it reports are the awake
workers of its role; asking for fewer puts workers to sleep (through the router's /sleep, with
a drain) instead of deleting pods, and asking for more wakes sleeping workers first and adds
pods only for the rest. Pods are never removed by it: a sleeping worker holds no GPU memory
worth a pod's restart, and ``max_sleeping`` bounds how many it keeps (past that, the
Deployment shrinks as before).
"""
from __future__ import annotations

import json
import logging
import urllib.request
from typing import NamedTuple

from splitserve.planner.kube import Scale

log = logging.getLogger("splitserve.planner")


class WorkerState(NamedTuple):
    worker_id: str
    is_sleeping: bool


class RouterSleepAPI:
    """The router's sleep routes over HTTP (``base_url``: the router's HTTP address, no /v1)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def workers(self, role: str) -> list[WorkerState]:
        body = self._call("GET", "/is_sleeping")
        return sorted(WorkerState(w["worker_id"], w["is_sleeping"]) for w in body["workers"] if w["role"] == role)

    def sleep(self, worker_id: str, level: int, drain_seconds: float) -> None:
        self._call("POST", "/sleep", {"worker_id": worker_id, "level": level, "drain_seconds": drain_seconds})

    def wake(self, worker_id: str) -> None:
        self._call("POST", "/wake_up", {"worker_id": worker_id})

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read())


class SleepFirstScaler:
    """A Scaler (see loop.Scaler) whose replicas are the pool's awake workers."""

    def __init__(self, deployment, router: RouterSleepAPI, role: str, *, level: int = 1, drain_seconds: float = 30.0,
                 max_sleeping: int = 1) -> None:
        self.deployment = deployment  # a DeploymentScaler
        self.router = router
        self.role = role
        self.level = level
        self.drain_seconds = drain_seconds
        self.max_sleeping = max_sleeping

    def get_scale(self) -> Scale:
        scale = self.deployment.get_scale()
        asleep = sum(w.is_sleeping for w in self.router.workers(self.role))
        return Scale(max(scale.replicas - asleep, 0), scale.selector)

    def set_replicas(self, replicas: int) -> None:
        workers = self.router.workers(self.role)
        awake = [w.worker_id for w in workers if not w.is_sleeping]
        asleep = [w.worker_id for w in workers if w.is_sleeping]
        if replicas < len(awake):
            room = max(self.max_sleeping - len(asleep), 0)
            to_sleep = awake[len(awake) - min(len(awake) - replicas, room):]
            for worker_id in to_sleep:
                log.info("%s: putting %s to sleep (level %d)", self.role, worker_id, self.level)
                self.router.sleep(worker_id, self.level, self.drain_seconds)
            rest = len(awake) - replicas - len(to_sleep)
            if rest > 0:  # more than may sleep: the Deployment shrinks by the rest
                self.deployment.set_replicas(self.deployment.get_scale().replicas - rest)
            return
        missing = replicas - len(awake)
        for worker_id in asleep[:missing]:
            log.info("%s: waking %s", self.role, worker_id)
            self.router.wake(worker_id)
        rest = missing - min(missing, len(asleep))
        if rest > 0:
            self.deployment.set_replicas(self.deployment.get_scale().replicas + rest)
