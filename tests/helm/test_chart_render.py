"""Render the chart with the real Helm engine (helm-python-sdk) across value combinations,
validate every manifest against the Kubernetes 1.30 schemas (kubernetes-validate, strict:
unknown fields fail), and check what the manifests say."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "splitserve"
KUBE_VERSION = "1.30"
RELEASE, NAMESPACE = "llm", "serving"
PREFIX = f"{RELEASE}-splitserve"


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART) as c:
        yield c


def validate_service_monitor(doc: dict) -> None:
    # Not in kubernetes-validate's schemas (a Prometheus Operator CRD): check the fields the
    # operator requires and this chart sets.
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    spec = doc["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert spec["selector"]["matchLabels"] and spec["endpoints"]
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout"} and ep["port"]


def validate_scaled_object(doc: dict) -> None:
    # A KEDA CRD, not in kubernetes-validate's schemas: the fields KEDA requires and this chart sets.
    assert doc["apiVersion"] == "keda.sh/v1alpha1" and set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    spec = doc["spec"]
    assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod", "triggers"}
    assert spec["scaleTargetRef"]["name"] and spec["triggers"]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus" and set(trigger["metadata"]) == {"serverAddress", "query", "threshold"}
        assert all(isinstance(v, str) for v in trigger["metadata"].values())  # KEDA takes strings only


def validate_http_route(doc: dict) -> None:
    # Gateway API CRD (v1): the fields this chart sets.
    assert doc["apiVersion"] == "gateway.networking.k8s.io/v1" and set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(doc["spec"]) <= {"parentRefs", "hostnames", "rules"} and doc["spec"]["parentRefs"]
    for rule in doc["spec"]["rules"]:
        assert set(rule) <= {"matches", "backendRefs"}
        for ref in rule["backendRefs"]:
            assert set(ref) == {"name", "port"} and isinstance(ref["port"], int)


@pytest.fixture(scope="module", autouse=True)
def schemas_loaded_once():
    # kubernetes-validate reads the (large) schema files on every call; read each once.
    original = kubernetes_validate.utils.schema_contents
    kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(original)
    yield
    kubernetes_validate.utils.schema_contents = original


@functools.lru_cache(maxsize=None)
def validate(doc_json: str) -> None:
    doc = json.loads(doc_json)
    crds = {"ServiceMonitor": validate_service_monitor, "ScaledObject": validate_scaled_object, "HTTPRoute": validate_http_route}
    if doc["kind"] in crds:
        crds[doc["kind"]](doc)
        return
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}") from None


def render(chart, values: dict) -> dict[tuple[str, str], dict]:
    """Every manifest, validated, by (kind, name)."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    manifests = {}
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            validate(json.dumps(doc, sort_keys=True))  # identical manifests are validated once
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in manifests, f"duplicate {key}"
            manifests[key] = doc
    return manifests


def container(manifests, component: str) -> dict:
    return pod_spec(manifests, component)["containers"][0]


def pod_spec(manifests, component: str) -> dict:
    kind = "StatefulSet" if component == "redis" else "Deployment"
    return manifests[(kind, f"{PREFIX}-{component}")]["spec"]["template"]["spec"]


def flags(c: dict) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in c["args"] if a.startswith("--") and "=" in a)


def env_secret(c: dict, name: str) -> tuple[str, str] | None:
    for e in c.get("env", []):
        if e["name"] == name:
            ref = e["valueFrom"]["secretKeyRef"]
            return ref["name"], ref["key"]
    return None


COMBINATIONS = {
    "defaults": {},
    "tp2-prefill-tp1-decode": {"prefill": {"tpSize": 2}, "decode": {"tpSize": 1}},
    "external-redis": {"redis": {"mode": "external", "external": {"url": "redis://redis.shared:6379/2"},
                                 "passwordSecret": {"name": "redis-creds", "key": "password"}}},
    "hpa": {"prefill": {"autoscaling": {"enabled": True}}, "decode": {"autoscaling": {"enabled": True, "maxReplicas": 8}}},
    "planner": {"planner": {"enabled": True}},
    "planner-prometheus": {"planner": {"enabled": True, "metricsSource": "prometheus",
                                       "prometheusUrl": "http://prometheus.monitoring:9090", "dryRun": True}},
    "servicemonitor": {"monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
                                      "scrapeAnnotations": True}},
    "model-pvc": {"model": {"source": "pvc", "pvc": {"claimName": "llama-3-8b"}, "dir": "Meta-Llama-3-8B"}},
    "model-hostpath": {"model": {"source": "hostPath", "hostPath": {"path": "/mnt/models"}, "dir": "qwen3"}},
    "model-image": {"model": {"source": "image", "image": {"repository": "registry.local/models/llama", "tag": "8b"}}},
    "tls-and-api-keys": {"router": {"tls": {"enabled": True, "secretName": "router-tls"}},
                         "auth": {"apiKeysSecret": "splitserve-keys"}},
    "worker-keys": {"auth": {"apiKeysSecret": "splitserve-keys", "workerKeysSecret": "splitserve-worker-keys"}},
    "internal-mtls": {"router": {"tls": {"enabled": True, "secretName": "router-tls"}},
                      "internalTLS": {"enabled": True, "secretName": "splitserve-internal-tls", "serverName": "worker.splitserve"}},
    "redis-persistence": {"redis": {"bundled": {"persistence": {"enabled": True, "storageClass": "fast"}}}},
    "minimal": {"networkPolicy": {"enabled": False}, "serviceAccount": {"create": False},
                "router": {"pdb": {"enabled": False}, "preStopSleepSeconds": 0},
                "prefill": {"pdb": {"enabled": False}}, "decode": {"pdb": {"minAvailable": "50%"}}},
    "scheduling": {
        "prefill": {"tpSize": 4, "preStopSleepSeconds": 10, "nodeSelector": {"gpu": "h100"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                   "whenUnsatisfiable": "ScheduleAnyway",
                                                   "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "prefill"}}}]},
        "decode": {"tpSize": 8, "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h200"]}]}]}}},
                   "extraArgs": ["--max-num-seqs=256"], "extraEnv": [{"name": "NCCL_DEBUG", "value": "WARN"}]},
        "podSecurityContext": {"runAsNonRoot": True, "runAsUser": 1000},
    },
}


def test_lint_is_clean():
    report = helm_python.lint(CHART, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}.0")
    assert report["errors"] == [], report
    assert all(m["severity"] < 2 for m in report["messages"]), report["messages"]


@pytest.mark.parametrize("values", COMBINATIONS.values(), ids=COMBINATIONS.keys())
def test_renders_valid_manifests(chart, values):
    manifests = render(chart, values)
    kinds = {kind for kind, _ in manifests}
    assert {"Deployment", "Service"} <= kinds
    for component in ("router", "prefill", "decode"):
        assert ("Deployment", f"{PREFIX}-{component}") in manifests
    # Every workload selects its own pods, and every Service, PDB and NetworkPolicy selects a workload.
    workloads = [d for (k, _), d in manifests.items() if k in ("Deployment", "StatefulSet")]
    for w in workloads:
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads]
    for (kind, name), doc in manifests.items():
        if kind == "Service":
            selector = doc["spec"]["selector"]
        elif kind in ("PodDisruptionBudget",):
            selector = doc["spec"]["selector"]["matchLabels"]
        elif kind == "NetworkPolicy":
            selector = doc["spec"]["podSelector"]["matchLabels"]
        else:
            continue
        assert any(selector.items() <= labels.items() for labels in pod_labels), f"{kind}/{name} selects no pods"


def test_lint_passes_for_each_combination():
    for name, values in COMBINATIONS.items():
        report = helm_python.lint(CHART, values, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}.0")
        assert report["errors"] == [], (name, report)


@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 1), (2, 1), (4, 8)])
def test_gpus_per_pod_equal_tp_size(chart, prefill_tp, decode_tp):
    manifests = render(chart, {"prefill": {"tpSize": prefill_tp}, "decode": {"tpSize": decode_tp}})
    for component, tp in (("prefill", prefill_tp), ("decode", decode_tp)):
        c = container(manifests, component)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == tp
        assert c["resources"]["requests"]["nvidia.com/gpu"] == tp
        assert flags(c)["tp-size"] == str(tp)
        assert c["args"][0] == component
    assert "nvidia.com/gpu" not in container(manifests, "router")["resources"].get("limits", {})


def test_step_limits_are_per_pool(chart):
    """Defaults: large steps for prefill workers, short prompt chunks on decode workers (they
    prefill when colocated or recomputing, and every running stream waits for the step)."""
    defaults = render(chart, {})
    assert {k: flags(container(defaults, "prefill"))[k] for k in ("max-num-seqs", "max-num-batched-tokens")} == {"max-num-seqs": "256", "max-num-batched-tokens": "8192"}
    assert {k: flags(container(defaults, "decode"))[k] for k in ("max-num-seqs", "max-num-batched-tokens")} == {"max-num-seqs": "256", "max-num-batched-tokens": "2048"}
    tuned = render(chart, {"decode": {"maxNumSeqs": 512, "maxNumBatchedTokens": 4096}})
    assert flags(container(tuned, "decode"))["max-num-batched-tokens"] == "4096"
    assert flags(container(tuned, "decode"))["max-num-seqs"] == "512"
    with pytest.raises(Exception, match="maxNumBatchedTokens"):
        chart.render({"prefill": {"maxNumBatchedTokens": 0}}, name=RELEASE, namespace=NAMESPACE)


def test_async_scheduling_is_per_pool_and_takes_yaml_booleans(chart):
    defaults = render(chart, {})
    assert flags(container(defaults, "prefill"))["async-scheduling"] == flags(container(defaults, "decode"))["async-scheduling"] == "auto"
    # `asyncScheduling: off` in a values file arrives as the boolean false.
    assert flags(container(render(chart, {"decode": {"asyncScheduling": False}}), "decode"))["async-scheduling"] == "off"
    assert flags(container(render(chart, {"prefill": {"asyncScheduling": "on"}}), "prefill"))["async-scheduling"] == "on"
    with pytest.raises(Exception, match="asyncScheduling"):
        chart.render({"decode": {"asyncScheduling": "sometimes"}}, name=RELEASE, namespace=NAMESPACE)
    assert flags(container(render(chart, {"prefill": {"tpSize": 2, "asyncScheduling": True}}), "prefill"))["async-scheduling"] == "on"


def test_tp_size_wins_over_a_gpu_count_in_resources(chart):
    manifests = render(chart, {"prefill": {"tpSize": 2, "resources": {"limits": {"nvidia.com/gpu": 8, "memory": "10Gi"}}},
                               "gpuResourceName": "nvidia.com/gpu"})
    limits = container(manifests, "prefill")["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": 2, "memory": "10Gi"}


def test_worker_flags_ports_and_probes(chart):
    manifests = render(chart, {})
    for component, grpc, metrics in (("prefill", 50061, 9091), ("decode", 50071, 9092)):
        c = container(manifests, component)
        f = flags(c)
        assert f["port"] == str(grpc) and f["metrics-port"] == str(metrics) and f["host"] == "0.0.0.0"
        assert f["advertise-address"] == f"$(POD_IP):{grpc}" and f["worker-id"] == "$(POD_NAME)"
        assert f["control-plane"] == f"redis://{PREFIX}-redis:6379/0"
        assert f["device"] == "cuda"
        # The worker drains within the grace period the kubelet gives it.
        assert int(f["drain-seconds"]) + 10 <= pod_spec(manifests, component)["terminationGracePeriodSeconds"]
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": grpc, "metrics": metrics, "kv-transfer": 5600}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": grpc}
        assert "lifecycle" not in c  # no Service traffic to wait out: SIGTERM starts the drain
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert container(manifests, "router")["lifecycle"]["preStop"]["sleep"]["seconds"] == 5
    assert pod_spec(manifests, "decode")["terminationGracePeriodSeconds"] == 300
    assert pod_spec(manifests, "prefill")["terminationGracePeriodSeconds"] == 120


def test_router_flags_service_and_probes(chart):
    manifests = render(chart, {})
    c = container(manifests, "router")
    f = flags(c)
    assert c["command"] == ["splitserve"] and c["args"][0] == "router"
    assert (f["port"], f["http-port"], f["metrics-port"]) == ("50051", "8000", "9090")
    assert f["drain-seconds"] == "45"  # 60 s grace - 5 s preStop - 10 s to exit
    assert "tls-cert" not in f and "api-keys-file" not in f
    assert c["readinessProbe"]["grpc"] == {"port": 50051}
    svc = manifests[("Service", f"{PREFIX}-router")]
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": 50051, "http": 8000, "metrics": 9090}


def test_router_tls_and_api_keys(chart):
    manifests = render(chart, COMBINATIONS["tls-and-api-keys"])
    c = container(manifests, "router")
    f = flags(c)
    assert f["tls-cert"] == "/etc/splitserve/tls/tls.crt" and f["tls-key"] == "/etc/splitserve/tls/tls.key"
    assert f["api-keys-file"] == "/etc/splitserve/auth/keys"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["tls"] == "/etc/splitserve/tls" and mounts["api-keys"] == "/etc/splitserve/auth"
    volumes = {v["name"]: v for v in pod_spec(manifests, "router")["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "router-tls"
    assert volumes["api-keys"]["secret"] == {"secretName": "splitserve-keys", "defaultMode": 0o440,
                                             "items": [{"key": "keys", "path": "keys"}]}
    # The kubelet's gRPC probe cannot speak TLS.
    assert c["readinessProbe"]["tcpSocket"] == {"port": "grpc"}


def test_worker_keys_reach_the_router_and_both_pools_and_no_client_key_does(chart):
    manifests = render(chart, COMBINATIONS["worker-keys"])
    for component in ("router", "prefill", "decode"):
        c = container(manifests, component)
        assert flags(c)["worker-keys-file"] == "/etc/splitserve/worker-auth/keys", component
        assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["worker-keys"] == "/etc/splitserve/worker-auth"
        volumes = {v["name"]: v for v in pod_spec(manifests, component)["volumes"]}
        assert volumes["worker-keys"]["secret"] == {"secretName": "splitserve-worker-keys", "defaultMode": 0o440,
                                                    "items": [{"key": "keys", "path": "keys"}]}
        if component != "router":  # the client keys stay on the router
            assert "api-keys-file" not in flags(c) and "api-keys" not in volumes
    for component in ("router", "prefill", "decode"):  # unset: no flag, no volume
        c = container(render(chart, {}), component)
        assert "worker-keys-file" not in flags(c)


def test_bundled_redis_and_its_password(chart):
    manifests = render(chart, {})
    secret = manifests[("Secret", f"{PREFIX}-redis")]
    assert len(secret["data"]["redis-password"]) > 20
    redis = container(manifests, "redis")
    assert redis["args"][:2] == ["--requirepass", "$(REDIS_PASSWORD)"]
    for component in ("router", "prefill", "decode", "redis"):
        assert env_secret(container(manifests, component), "REDIS_PASSWORD") == (f"{PREFIX}-redis", "redis-password")
    assert ("Service", f"{PREFIX}-redis") in manifests


def test_external_redis_has_no_bundled_parts(chart):
    manifests = render(chart, COMBINATIONS["external-redis"])
    assert not [key for key in manifests if key[1] == f"{PREFIX}-redis"]
    for component in ("router", "prefill", "decode"):
        c = container(manifests, component)
        assert flags(c)["control-plane"] == "redis://redis.shared:6379/2"
        assert env_secret(c, "REDIS_PASSWORD") == ("redis-creds", "password")


def test_external_redis_without_password(chart):
    manifests = render(chart, {"redis": {"mode": "external", "external": {"url": "redis://r:6379/0"}}})
    assert env_secret(container(manifests, "router"), "REDIS_PASSWORD") is None


@pytest.mark.parametrize("name", ["model-pvc", "model-hostpath", "model-image"])
def test_model_sources(chart, name):
    manifests = render(chart, COMBINATIONS[name])
    for component in ("router", "prefill", "decode"):
        spec = pod_spec(manifests, component)
        volume = next(v for v in spec["volumes"] if v["name"] == "model")
        model_flag = flags(spec["containers"][0])["model"]
        if name == "model-pvc":
            assert volume["persistentVolumeClaim"] == {"claimName": "llama-3-8b", "readOnly": True}
            assert model_flag == "/models/Meta-Llama-3-8B"
        elif name == "model-hostpath":
            assert volume["hostPath"] == {"path": "/mnt/models", "type": "Directory"}
            assert model_flag == "/models/qwen3"
        else:
            assert "emptyDir" in volume
            init = spec["initContainers"][0]
            assert init["image"] == "registry.local/models/llama:8b"
            assert init["command"] == ["cp", "-a", "/model/.", "/models/"]
            assert model_flag == "/models"
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in spec["containers"][0]["volumeMounts"]


def test_replicas_left_to_hpa_or_planner(chart):
    manifests = render(chart, {"prefill": {"replicas": 3}, "decode": {"replicas": 2}})
    assert manifests[("Deployment", f"{PREFIX}-prefill")]["spec"]["replicas"] == 3
    assert manifests[("Deployment", f"{PREFIX}-decode")]["spec"]["replicas"] == 2
    for values in (COMBINATIONS["hpa"], COMBINATIONS["planner"]):
        manifests = render(chart, values)
        for pool in ("prefill", "decode"):
            assert "replicas" not in manifests[("Deployment", f"{PREFIX}-{pool}")]["spec"]


def test_hpa_per_pool(chart):
    manifests = render(chart, COMBINATIONS["hpa"])
    prefill, decode = (manifests[("HorizontalPodAutoscaler", f"{PREFIX}-{p}")] for p in ("prefill", "decode"))
    assert prefill["apiVersion"] == "autoscaling/v2"
    assert prefill["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{PREFIX}-prefill"}
    assert prefill["spec"]["metrics"][0]["pods"]["metric"]["name"] == "splitserve_waiting_requests"
    assert decode["spec"]["metrics"][0]["pods"]["metric"]["name"] == "splitserve_kv_cache_utilization"
    assert (decode["spec"]["minReplicas"], decode["spec"]["maxReplicas"]) == (1, 8)
    assert not any(k == "HorizontalPodAutoscaler" for k, _ in render(chart, {}))


def test_network_policies(chart):
    manifests = render(chart, {"planner": {"enabled": True}})
    router_sel = {"app.kubernetes.io/name": "splitserve", "app.kubernetes.io/instance": RELEASE,
                  "app.kubernetes.io/component": "router"}
    worker_sels = [{**router_sel, "app.kubernetes.io/component": c} for c in ("prefill", "decode")]
    planner_sel = {**router_sel, "app.kubernetes.io/component": "planner"}
    for pool, grpc, metrics in (("prefill", 50061, 9091), ("decode", 50071, 9092)):
        np = manifests[("NetworkPolicy", f"{PREFIX}-{pool}")]
        assert np["spec"]["policyTypes"] == ["Ingress"]
        rules = {tuple(p["port"] for p in r["ports"]): r for r in np["spec"]["ingress"]}
        assert set(rules) == {(grpc,), (5600,), (metrics,)}
        # gRPC: the router; prefill also the decode side (lease renewal and release, worker.proto).
        grpc_from = [router_sel] + ([worker_sels[1]] if pool == "prefill" else [])
        assert rules[(grpc,)]["from"] == [{"podSelector": {"matchLabels": s}} for s in grpc_from]
        kv = rules[(5600,)]
        assert kv["ports"][0]["endPort"] == 5631
        assert kv["from"] == [{"podSelector": {"matchLabels": s}} for s in worker_sels]
        assert rules[(metrics,)]["from"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
            {"podSelector": {"matchLabels": planner_sel}}]
    router_np = manifests[("NetworkPolicy", f"{PREFIX}-router")]
    public = router_np["spec"]["ingress"][0]
    assert "from" not in public and [p["port"] for p in public["ports"]] == [50051, 8000]
    redis_np = manifests[("NetworkPolicy", f"{PREFIX}-redis")]
    assert len(redis_np["spec"]["ingress"][0]["from"]) == 3
    # UCX's TCP transport is held inside the range the policy opens.
    env = {e["name"]: e.get("value") for e in container(manifests, "prefill")["env"]}
    assert env["UCX_TCP_PORT_RANGE"] == "5600-5631"


def test_network_policy_peers_are_configurable(chart):
    peers = [{"namespaceSelector": {"matchLabels": {"team": "gateway"}}}]
    manifests = render(chart, {"networkPolicy": {"routerFrom": peers, "metricsFrom": []}})
    assert manifests[("NetworkPolicy", f"{PREFIX}-router")]["spec"]["ingress"] == [
        {"ports": [{"port": 50051, "protocol": "TCP"}, {"port": 8000, "protocol": "TCP"}], "from": peers}]
    # No metrics peers and no planner: the metrics port stays closed.
    assert len(manifests[("NetworkPolicy", f"{PREFIX}-decode")]["spec"]["ingress"]) == 2
    assert not any(k == "NetworkPolicy" for k, _ in render(chart, {"networkPolicy": {"enabled": False}}))


def test_service_monitor_selects_metrics_ports(chart):
    manifests = render(chart, COMBINATIONS["servicemonitor"])
    sm = manifests[("ServiceMonitor", PREFIX)]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    match, [expr] = sm["spec"]["selector"]["matchLabels"], sm["spec"]["selector"]["matchExpressions"]
    selected = [doc for (kind, _), doc in manifests.items() if kind == "Service"
                and match.items() <= doc["metadata"]["labels"].items()
                and doc["metadata"]["labels"][expr["key"]] in expr["values"]]
    assert {s["metadata"]["name"] for s in selected} == {f"{PREFIX}-{c}" for c in ("router", "prefill", "decode")}
    port = sm["spec"]["endpoints"][0]["port"]
    assert all(any(p["name"] == port for p in s["spec"]["ports"]) for s in selected)
    assert not any(k == "ServiceMonitor" for k, _ in render(chart, {}))
    annotations = manifests[("Deployment", f"{PREFIX}-decode")]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9092"


def test_service_accounts_and_least_privilege_rbac(chart):
    manifests = render(chart, {"planner": {"enabled": True}})
    assert not any(k in ("ClusterRole", "ClusterRoleBinding") for k, _ in manifests)
    sa = manifests[("ServiceAccount", PREFIX)]
    assert sa["automountServiceAccountToken"] is False
    for component in ("router", "prefill", "decode"):
        spec = pod_spec(manifests, component)
        assert spec["serviceAccountName"] == PREFIX and spec["automountServiceAccountToken"] is False
    role = manifests[("Role", f"{PREFIX}-planner")]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["apps"], "resources": ["deployments/scale"],
         "resourceNames": [f"{PREFIX}-prefill", f"{PREFIX}-decode"], "verbs": ["get", "patch"]},
    ]
    binding = manifests[("RoleBinding", f"{PREFIX}-planner")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{PREFIX}-planner", "namespace": NAMESPACE}]
    assert pod_spec(manifests, "planner")["serviceAccountName"] == f"{PREFIX}-planner"
    assert not any(k == "Role" for k, _ in render(chart, {}))


def test_pdbs(chart):
    manifests = render(chart, COMBINATIONS["minimal"])
    assert ("PodDisruptionBudget", f"{PREFIX}-router") not in manifests
    assert manifests[("PodDisruptionBudget", f"{PREFIX}-decode")]["spec"]["minAvailable"] == "50%"
    assert render(chart, {})[("PodDisruptionBudget", f"{PREFIX}-prefill")]["spec"]["maxUnavailable"] == 1


def test_scheduling_values_reach_the_pods(chart):
    values = COMBINATIONS["scheduling"]
    manifests = render(chart, values)
    prefill, decode = pod_spec(manifests, "prefill"), pod_spec(manifests, "decode")
    assert prefill["nodeSelector"] == {"gpu": "h100"} and prefill["tolerations"] == values["prefill"]["tolerations"]
    assert prefill["topologySpreadConstraints"] == values["prefill"]["topologySpreadConstraints"]
    assert decode["affinity"] == values["decode"]["affinity"] and "nodeSelector" not in decode
    assert decode["containers"][0]["args"][-1] == "--max-num-seqs=256"
    assert {"name": "NCCL_DEBUG", "value": "WARN"} in decode["containers"][0]["env"]
    # Merged over the restricted defaults: the uid changes, the seccomp profile stays.
    assert decode["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 10001, "fsGroup": 10001,
                                         "seccompProfile": {"type": "RuntimeDefault"}}
    assert prefill["containers"][0]["lifecycle"] == {"preStop": {"sleep": {"seconds": 10}}}


def test_notes_tell_how_to_reach_the_router(chart):
    notes = chart.render({}, name=RELEASE, namespace=NAMESPACE)["splitserve/templates/NOTES.txt"]
    assert f"{PREFIX}-router.{NAMESPACE}.svc:50051" in notes
    assert f"kubectl -n {NAMESPACE} port-forward svc/{PREFIX}-router 50051 8000" in notes


def test_the_validation_above_would_catch_a_bad_manifest(chart):
    deployment = render(chart, {})[("Deployment", f"{PREFIX}-prefill")]
    deployment["spec"]["template"]["spec"]["containers"][0]["gpus"] = 2  # no such field
    with pytest.raises(AssertionError, match="gpus"):
        validate(json.dumps(deployment, sort_keys=True))


def _cli_parse(c: dict):
    from splitserve.cli import build_parser

    env = {"POD_IP": "10.0.0.7", "POD_NAME": "pod-0"}
    args = [a.replace("$(POD_IP)", env["POD_IP"]).replace("$(POD_NAME)", env["POD_NAME"]) for a in c["args"]]
    return build_parser().parse_args(args)


@pytest.mark.parametrize("component", ["prefill", "decode"])
def test_worker_args_parse_with_the_splitserve_cli(chart, component):
    manifests = render(chart, {"prefill": {"tpSize": 2}, **COMBINATIONS["external-redis"]})
    args = _cli_parse(container(manifests, component))
    assert args.command == component
    assert (args.tp_size, args.device, args.host) == (2 if component == "prefill" else 1, "cuda", "0.0.0.0")
    assert args.advertise_address.startswith("10.0.0.7:") and args.worker_id == "pod-0"
    assert args.control_plane == "redis://redis.shared:6379/2"


def test_router_args_parse_with_the_splitserve_cli(chart):
    args = _cli_parse(container(render(chart, COMBINATIONS["tls-and-api-keys"]), "router"))
    assert args.command == "router" and args.port == 50051
    assert (args.http_port, str(args.tls_cert), str(args.tls_key)) == (8000, "/etc/splitserve/tls/tls.crt", "/etc/splitserve/tls/tls.key")
    assert str(args.api_keys_file) == "/etc/splitserve/auth/keys" and args.tls_ca is None


def test_internal_mutual_tls_reaches_router_and_workers(chart):
    manifests = render(chart, COMBINATIONS["internal-mtls"])
    router = _cli_parse(container(manifests, "router"))
    assert str(router.tls_ca) == "/etc/splitserve/internal-tls/ca.crt" and router.tls_server_name == "worker.splitserve"
    assert str(router.tls_client_cert) == "/etc/splitserve/internal-tls/tls.crt"
    for component in ("router", "prefill", "decode"):
        volumes = {v["name"]: v for v in pod_spec(manifests, component)["volumes"]}
        assert volumes["internal-tls"]["secret"]["secretName"] == "splitserve-internal-tls"
        mounts = {m["name"]: m["mountPath"] for m in container(manifests, component)["volumeMounts"]}
        assert mounts["internal-tls"] == "/etc/splitserve/internal-tls"
    for component in ("prefill", "decode"):
        c = container(manifests, component)
        args = _cli_parse(c)
        assert (str(args.tls_cert), str(args.tls_ca)) == ("/etc/splitserve/internal-tls/tls.crt", "/etc/splitserve/internal-tls/ca.crt")
        assert args.tls_server_name == "worker.splitserve"
        # The kubelet's gRPC probe cannot speak TLS: a worker that requires client certificates is probed by TCP.
        assert c["readinessProbe"]["tcpSocket"] == {"port": "grpc"} and "grpc" not in c["livenessProbe"]
    assert _cli_parse(container(render(chart, {}), "prefill")).tls_ca is None  # off by default
