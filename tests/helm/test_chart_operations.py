"""What operators plug the chart into: the restricted Pod Security Standard, extension points,
the Redis password through secretKeyRef only, KEDA, a Gateway API HTTPRoute, the Grafana
dashboard, and checkov over the rendered manifests (one run, every combination)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_chart_render import COMBINATIONS, NAMESPACE, PREFIX, RELEASE, container, flags, pod_spec, render

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = "http://prometheus-operated.monitoring:9090"
KEDA = {"prefill": {"keda": {"enabled": True, "serverAddress": PROMETHEUS}},
        "decode": {"keda": {"enabled": True, "serverAddress": PROMETHEUS, "threshold": "0.7", "maxReplicas": 6}}}
HTTP_ROUTE = {"router": {"httpRoute": {"enabled": True, "parentRefs": [{"name": "inference-gateway", "namespace": "gateways"}],
                                       "hostnames": ["llm.example.com"]}}}
DASHBOARD = {"monitoring": {"dashboard": {"enabled": True, "annotations": {"grafana_folder": "LLM"}}}}
EXTENSIONS = {
    component: {
        "podLabels": {"team": "inference"},
        "priorityClassName": "serving-critical",
        "runtimeClassName": "nvidia" if component in ("prefill", "decode") else "",
        "extraVolumes": [{"name": "cache", "emptyDir": {}}],
        "extraVolumeMounts": [{"name": "cache", "mountPath": "/cache"}],
        "extraInitContainers": [{"name": "wait", "image": "busybox:1.36", "command": ["true"],
                                 "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                     "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
                                 "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "16Mi"}}}],
        "extraEnv": [{"name": "EXTRA", "value": "1"}],
    }
    for component in ("router", "prefill", "decode", "planner")
}
EXTENSIONS["planner"]["enabled"] = True
OPERATIONS = {"keda": KEDA, "httproute": HTTP_ROUTE, "dashboard": DASHBOARD, "extensions": EXTENSIONS,
              "all-on": {**KEDA, **HTTP_ROUTE, **DASHBOARD}}
POD_COMPONENTS = ("router", "prefill", "decode", "redis")


@pytest.fixture(scope="module")
def chart():
    import helm_python

    with helm_python.Chart.load(ROOT / "helm" / "splitserve") as c:
        yield c


def all_containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


@pytest.mark.parametrize("values", [{}, COMBINATIONS["model-image"], {"planner": {"enabled": True}}], ids=["defaults", "model-image", "planner"])
def test_restricted_pod_security_by_default(chart, values):
    manifests = render(chart, values)
    components = POD_COMPONENTS + (("planner",) if values.get("planner") else ())
    for component in components:
        spec = pod_spec(manifests, component)
        assert spec["securityContext"]["runAsNonRoot"] is True, component
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, component
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), component
        assert not any("hostPath" in v for v in spec.get("volumes", [])), component
        for c in all_containers(spec):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, (component, c["name"])
            assert sc["readOnlyRootFilesystem"] is True and not sc.get("privileged"), (component, c["name"])
        if component != "redis":  # a read-only root: HOME and /tmp are an emptyDir
            mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
            assert mounts["/tmp"] == "tmp" and {"name": "tmp", "emptyDir": {}} in spec["volumes"]
            assert {"name": "HOME", "value": "/tmp"} in spec["containers"][0]["env"]


def test_a_component_loosens_its_own_security_context(chart):
    """RDMA needs IPC_LOCK (docs/kubernetes.md): granted to one pool, nobody else."""
    manifests = render(chart, {"decode": {"securityContext": {"capabilities": {"add": ["IPC_LOCK"]}}}})
    assert container(manifests, "decode")["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert container(manifests, "decode")["securityContext"]["readOnlyRootFilesystem"] is True
    assert "add" not in container(manifests, "prefill")["securityContext"]["capabilities"]


def test_extension_points_reach_every_pod(chart):
    manifests = render(chart, EXTENSIONS)
    for component in ("router", "prefill", "decode", "planner"):
        deployment = manifests[("Deployment", f"{PREFIX}-{component}")]
        spec = deployment["spec"]["template"]["spec"]
        assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "inference"
        # The selector stays the chart's own: extra labels never break an upgrade.
        assert "team" not in deployment["spec"]["selector"]["matchLabels"]
        assert spec["priorityClassName"] == "serving-critical"
        assert spec.get("runtimeClassName") == ("nvidia" if component in ("prefill", "decode") else None)
        assert {"name": "cache", "emptyDir": {}} in spec["volumes"]
        assert {"name": "cache", "mountPath": "/cache"} in spec["containers"][0]["volumeMounts"]
        assert spec["initContainers"][-1]["name"] == "wait"
        assert {"name": "EXTRA", "value": "1"} in spec["containers"][0]["env"]


def test_redis_password_only_through_secret_key_refs(chart):
    for values in ({}, COMBINATIONS["external-redis"]):
        manifests = render(chart, values)
        for component in POD_COMPONENTS:
            if ("StatefulSet" if component == "redis" else "Deployment", f"{PREFIX}-{component}") not in manifests:
                continue
            for c in all_containers(pod_spec(manifests, component)):
                for e in c.get("env", []):
                    if re.search("PASSWORD|AUTH", e["name"]):
                        assert set(e) == {"name", "valueFrom"} and "secretKeyRef" in e["valueFrom"], (component, e)
            if component != "redis":
                # The processes read it from the environment by name; it never appears in arguments.
                assert flags(container(manifests, component))["control-plane-password-env"] == "REDIS_PASSWORD"
    no_password = render(chart, {"redis": {"mode": "external", "external": {"url": "redis://r:6379/0"}}})
    assert "control-plane-password-env" not in flags(container(no_password, "router"))


def test_planner_probes_and_network_policy(chart):
    manifests = render(chart, {"planner": {"enabled": True}})
    c = container(manifests, "planner")
    assert c["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    policy = manifests[("NetworkPolicy", f"{PREFIX}-planner")]
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "planner"
    assert policy["spec"]["ingress"] == [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                                          "ports": [{"port": 9093, "protocol": "TCP"}]}]
    closed = render(chart, {"planner": {"enabled": True}, "networkPolicy": {"metricsFrom": []}})
    assert closed[("NetworkPolicy", f"{PREFIX}-planner")]["spec"]["ingress"] == []
    assert ("NetworkPolicy", f"{PREFIX}-planner") not in render(chart, {})


@pytest.mark.parametrize("enabled", [False, True], ids=["off", "on"])
def test_keda_scaled_object_per_pool(chart, enabled):
    manifests = render(chart, KEDA if enabled else {})
    for pool in ("prefill", "decode"):
        key = ("ScaledObject", f"{PREFIX}-{pool}")
        deployment = manifests[("Deployment", f"{PREFIX}-{pool}")]
        if not enabled:
            assert key not in manifests and deployment["spec"]["replicas"] == 1
            continue
        so = manifests[key]
        assert "replicas" not in deployment["spec"]  # KEDA owns them
        assert so["spec"]["scaleTargetRef"] == {"name": f"{PREFIX}-{pool}"}
        trigger = so["spec"]["triggers"][0]["metadata"]
        assert trigger["serverAddress"] == PROMETHEUS
        metric = "vllm:num_requests_waiting" if pool == "prefill" else "vllm:kv_cache_usage_perc"
        assert trigger["query"] == f'sum({metric}{{namespace="{NAMESPACE}",role="{pool}",pod=~"{PREFIX}-{pool}-.*"}})'
    if enabled:
        decode = manifests[("ScaledObject", f"{PREFIX}-decode")]["spec"]
        assert (decode["triggers"][0]["metadata"]["threshold"], decode["maxReplicaCount"]) == ("0.7", 6)
    notes = chart.render(KEDA if enabled else {}, name=RELEASE, namespace=NAMESPACE)["splitserve/templates/NOTES.txt"]
    assert ("prefill TP=1 (replicas set by KEDA)" if enabled else "prefill TP=1 (1 replicas)") in notes


@pytest.mark.parametrize("values,message", [
    ({**KEDA, "planner": {"enabled": True}}, "prefill.keda.enabled and planner.enabled each set"),
    ({"decode": {"keda": {"enabled": True, "serverAddress": PROMETHEUS}, "autoscaling": {"enabled": True}}}, "decode.autoscaling.enabled, decode.keda.enabled"),
    ({"prefill": {"keda": {"enabled": True, "serverAddress": PROMETHEUS, "minReplicas": 5}}}, r"prefill.keda.minReplicas \(5\) is above"),
])
def test_one_owner_of_a_pools_replicas(chart, values, message):
    import helm_python

    with pytest.raises(helm_python.HelmRenderError, match=message):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_keda_needs_a_prometheus(chart):
    import helm_python

    with pytest.raises(helm_python.HelmValuesError, match="/prefill/keda/serverAddress"):
        chart.validate_schema({"prefill": {"keda": {"enabled": True}}})


@pytest.mark.parametrize("enabled", [False, True], ids=["off", "on"])
def test_http_route(chart, enabled):
    manifests = render(chart, HTTP_ROUTE if enabled else {})
    key = ("HTTPRoute", f"{PREFIX}-router")
    if not enabled:
        assert key not in manifests
        return
    route = manifests[key]
    assert route["spec"]["parentRefs"] == [{"name": "inference-gateway", "namespace": "gateways"}]
    assert route["spec"]["hostnames"] == ["llm.example.com"]
    [rule] = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/v1"}}]
    router_service = manifests[("Service", f"{PREFIX}-router")]
    http_port = next(p["port"] for p in router_service["spec"]["ports"] if p["name"] == "http")
    assert rule["backendRefs"] == [{"name": router_service["metadata"]["name"], "port": http_port}]


def exported_series() -> set[str]:
    """Every sample name the router and the workers can export (from their real registries)."""
    from prometheus_client import CollectorRegistry

    from splitserve.services.metrics import ServiceMetrics

    names: set[str] = set()
    for role in ("router", "prefill", "decode"):
        m = ServiceMetrics(role)
        m.frontend_series("m") if role == "router" else m.engine_series("m")
        registry: CollectorRegistry = m.registry
        for family in registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
            names |= {family.name + s for s in suffixes}
    return names


@pytest.mark.parametrize("enabled", [False, True], ids=["off", "on"])
def test_grafana_dashboard(chart, enabled):
    manifests = render(chart, DASHBOARD if enabled else {})
    key = ("ConfigMap", f"{PREFIX}-dashboard")
    if not enabled:
        assert key not in manifests
        return
    configmap = manifests[key]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"  # the sidecar's default label
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    dashboard = json.loads(configmap["data"]["splitserve.json"])
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Router (what clients see)", "Prefill pool", "Decode pool", "KV transfer (prefill -> decode)"]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    read = set(re.findall(r"\b(vllm:[a-z0-9_]+|splitserve_[a-z0-9_]+)", " ".join(exprs)))
    assert read - exported_series() == set(), "the dashboard reads series nobody exports"
    assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "splitserve_kv_transfer_bytes_total"} <= read
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_dashboard_file_is_what_its_script_writes():
    result = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'scripts'); import grafana_dashboard as g; print(g.render(), end='')"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    assert (ROOT / "helm" / "splitserve" / "dashboards" / "splitserve.json").read_text() == result.stdout, \
        "run python scripts/grafana_dashboard.py"


# checkov's Kubernetes checks that stay off, each for a reason that holds for this chart:
CHECKOV_SKIPS = {
    # CPU limits: CFS throttling stalls the engine loop and the router's event loop mid-step;
    # the pods request CPU and limit memory (every container sets both).
    "CKV_K8S_11": "CPU limits",
    # imagePullPolicy Always: tags are fixed per release (and image.digest pins one); pulling a
    # 10+ GB serving image on every start would only slow scale-up.
    "CKV_K8S_15": "imagePullPolicy Always",
    # Default namespace: `helm template` leaves metadata.namespace out; Helm installs every
    # resource into the release namespace (the test renders with namespace=serving).
    "CKV_K8S_21": "default namespace",
    # Secrets as files: the Redis password goes through secretKeyRef by design (issue 24:
    # secrets only through secretKeyRef); TLS certificates and API keys already are files.
    "CKV_K8S_35": "secrets as environment variables",
    # Service-account token: only the planner mounts one; it calls the Kubernetes API (scale
    # subresource) under a Role limited to its two Deployments.
    "CKV_K8S_38": "service account token of the planner",
    # Image digest: image.digest pins one; the chart cannot know the digest of the operator's
    # build, and the bundled Redis image is the operator's choice (redis.bundled.image).
    "CKV_K8S_43": "image digest",
}


CHECKOV = Path(__file__).resolve().parents[2] / ".venv-tools" / "bin" / "checkov"


def test_checkov_finds_nothing_over_every_combination(chart, tmp_path):
    # scripts/install.sh puts checkov in an environment of its own: its pins would downgrade
    # packages (packaging, networkx) in the one splitserve runs in.
    checkov = str(CHECKOV) if CHECKOV.exists() else shutil.which("checkov")
    if checkov is None:
        pytest.fail(f"checkov is not installed: bash scripts/install.sh (it makes {CHECKOV})")
    combinations = {**COMBINATIONS, **OPERATIONS, "planner-everything": {"planner": {"enabled": True}, **HTTP_ROUTE, **DASHBOARD}}
    combinations.pop("scheduling")  # its podSecurityContext is a test of overriding, not a default
    for name, values in combinations.items():
        docs = list(render(chart, values).values())
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(docs))
    # One run over every file: checkov's start-up costs more than its checks.
    result = subprocess.run(
        [checkov, "-d", str(tmp_path), "--framework", "kubernetes", "--skip-check", ",".join(CHECKOV_SKIPS),
         "--output", "json", "--quiet", "--compact", "--skip-download"],
        capture_output=True, text=True, timeout=600,
    )
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = [(f["check_id"], f["check_name"], f["resource"], f["file_path"]) for f in report["results"]["failed_checks"]]
    assert failed == [], "\n".join(map(str, failed))
    assert report["summary"]["passed"] > 1000 and report["summary"]["parsing_errors"] == 0, report["summary"]
