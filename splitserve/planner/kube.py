"""The planner's Kubernetes side: a Deployment's scale subresource and its pods.

Needs only what the chart's Role grants: get/patch ``deployments/scale`` and list ``pods``.
"""
from __future__ import annotations

from typing import NamedTuple

from splitserve.planner.sources import PodTarget


class Scale(NamedTuple):
    replicas: int  # spec: what the Deployment asks for
    selector: str  # its pods' label selector, as the scale subresource reports it


class DeploymentScaler:
    """Reads and sets one Deployment's replicas, and lists its ready pods' metrics ports."""

    def __init__(self, apps_api, core_api, namespace: str, name: str, *, metrics_port_name: str = "metrics"):
        self._apps = apps_api  # kubernetes.client.AppsV1Api
        self._core = core_api  # kubernetes.client.CoreV1Api
        self.namespace = namespace
        self.name = name
        self._metrics_port_name = metrics_port_name

    def get_scale(self) -> Scale:
        scale = self._apps.read_namespaced_deployment_scale(self.name, self.namespace)
        return Scale(scale.spec.replicas or 0, scale.status.selector or "")

    def set_replicas(self, replicas: int) -> None:
        self._apps.patch_namespaced_deployment_scale(self.name, self.namespace, {"spec": {"replicas": replicas}})

    def list_metrics_targets(self) -> list[PodTarget]:
        selector = self.get_scale().selector
        if not selector:
            return []  # an empty selector would list every pod in the namespace
        pods = self._core.list_namespaced_pod(self.namespace, label_selector=selector).items
        return [t for t in map(self._target, pods) if t is not None]

    def _target(self, pod) -> PodTarget | None:
        status = pod.status
        if pod.metadata.deletion_timestamp is not None or status is None or status.phase != "Running" or not status.pod_ip:
            return None
        if not any(c.type == "Ready" and c.status == "True" for c in status.conditions or ()):
            return None
        for container in pod.spec.containers:
            for port in container.ports or ():
                if port.name == self._metrics_port_name:
                    return PodTarget(pod.metadata.name, pod.metadata.uid, status.pod_ip, port.container_port)
        return None
