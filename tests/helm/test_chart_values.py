"""values.schema.json and the chart's own checks reject wrong values with a message that
names the field; the planner reads the policy the chart renders."""
from __future__ import annotations

from pathlib import Path

import helm_python
import pytest
import yaml

from splitserve.planner import load_policies

CHART = Path(__file__).resolve().parents[2] / "helm" / "splitserve"


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART) as c:
        yield c


REJECTED = [
    ({"prefill": {"replicas": -1}}, "/prefill/replicas", "minimum"),
    ({"router": {"replicas": -2}}, "/router/replicas", "minimum"),
    ({"decode": {"tpSize": 0}}, "/decode/tpSize", "minimum: got 0, want 1"),
    ({"prefill": {"tpSize": -4}}, "/prefill/tpSize", "minimum"),
    ({"prefill": {"tpSize": "2"}}, "/prefill/tpSize", "got string, want integer"),
    ({"decode": {"tpSize": 1.5}}, "/decode/tpSize", "got number, want integer"),
    # null deletes a key in Helm's coalescing: the required key is then missing.
    ({"prefill": {"tpSize": None}}, "/prefill", "missing property 'tpSize'"),
    ({"replicas": 2}, "additional properties 'replicas' not allowed", ""),
    ({"prefill": {"tpsize": 2}}, "/prefill", "additional properties 'tpsize' not allowed"),
    ({"router": {"ports": {"grpc": 50051, "https": 443}}}, "/router/ports", "'https' not allowed"),
    ({"decode": {"ports": {"grpc": 0}}}, "/decode/ports/grpc", "minimum"),
    ({"kvTransfer": {"port": 70000}}, "/kvTransfer/port", "maximum"),
    ({"model": {"source": "s3"}}, "/model/source", "value must be one of"),
    ({"model": {"source": "hostPath"}}, "/model/hostPath/path", "minLength"),
    ({"model": {"source": "image"}}, "/model/image/repository", "minLength"),
    ({"redis": {"mode": "cluster"}}, "/redis/mode", "value must be one of"),
    ({"redis": {"mode": "external"}}, "/redis/external/url", "minLength"),
    ({"redis": {"external": {"url": "localhost:6379"}}}, "/redis/external/url", "does not match pattern"),
    ({"router": {"tls": {"enabled": True}}}, "/router/tls/secretName", "minLength"),
    ({"internalTLS": {"enabled": True}}, "/internalTLS/secretName", "minLength"),
    ({"internalTLS": {"enabled": True, "secretName": "s", "ca": "ca.crt"}}, "/internalTLS", "'ca' not allowed"),
    ({"prefill": {"autoscaling": {"maxReplicas": 0}}}, "/prefill/autoscaling/maxReplicas", "minimum"),
    ({"prefill": {"resources": {"limits": {"memory": "lots"}}}}, "/prefill/resources/limits/memory", ""),
    ({"planner": {"enabled": "yes"}}, "/planner/enabled", "got string, want boolean"),
    ({"planner": {"decode": {"minReplicas": 0}}}, "/planner/decode/minReplicas", "minimum"),
    ({"planner": {"prefill": {"targets": {"queueDepth": {"high": 1, "low": 0}}}}}, "/planner/prefill/targets", "'queueDepth' not allowed"),
    ({"planner": {"decode": {"smoothing": 0}}}, "/planner/decode/smoothing", "exclusiveMinimum"),
    ({"planner": {"metricsSource": "statsd"}}, "/planner/metricsSource", "value must be one of"),
]


@pytest.mark.parametrize("values,field,detail", REJECTED, ids=[f for _, f, _ in REJECTED])
def test_schema_rejects_with_the_field_named(chart, values, field, detail):
    with pytest.raises(helm_python.HelmValuesError) as e:
        chart.validate_schema(values)
    assert field in str(e.value) and detail in str(e.value), str(e.value)
    # An install renders through the same check.
    with pytest.raises(helm_python.HelmValuesError, match=field.split("/")[-1] or "replicas"):
        chart.render(values, name="llm", namespace="serving")


def test_lint_reports_schema_errors():
    report = helm_python.lint(CHART, {"decode": {"tpSize": 0}})
    assert any("/decode/tpSize" in err for err in report["errors"]), report


def test_set_flags_type_the_tp_size_as_helm_does(chart):
    # `--set prefill.tpSize=2` gives an integer and passes; `--set-string` gives "2" and fails.
    chart.validate_schema(helm_python.parse_set_string("prefill.tpSize=2,decode.tpSize=1"))
    with pytest.raises(helm_python.HelmValuesError, match="/prefill/tpSize"):
        chart.validate_schema(helm_python.parse_set_string_values("prefill.tpSize=2"))


@pytest.mark.parametrize("values,message", [
    ({"prefill": {"autoscaling": {"enabled": True}}, "planner": {"enabled": True}},
     "prefill.autoscaling.enabled, prefill.keda.enabled and planner.enabled each set the prefill Deployment's replicas"),
    ({"decode": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
     "decode.autoscaling.minReplicas (5) is above decode.autoscaling.maxReplicas (2)"),
    ({"planner": {"enabled": True, "prefill": {"minReplicas": 6}}},
     "planner.prefill.minReplicas (6) is above planner.prefill.maxReplicas (4)"),
    ({"planner": {"enabled": True, "decode": {"targets": {"kvCacheUtilization": {"high": 0.5, "low": 0.9}}}}},
     "planner.decode.targets.kvCacheUtilization: low (0.9) must be below high (0.5)"),
    ({"kvTransfer": {"port": 5600, "endPort": 5600}}, "kvTransfer.endPort (5600) must be above kvTransfer.port (5600)"),
    ({"planner": {"enabled": True, "metricsSource": "prometheus"}},
     "planner.prometheusUrl is required when planner.metricsSource is prometheus"),
])
def test_chart_checks_what_the_schema_cannot(chart, values, message):
    chart.validate_schema(values)
    with pytest.raises(helm_python.HelmRenderError, match=message.replace("(", r"\(").replace(")", r"\)")):
        chart.render(values, name="llm", namespace="serving")


def _rendered_policy(chart, values) -> dict:
    out = chart.render({"planner": {"enabled": True, **values}}, name="llm", namespace="serving")
    configmap = yaml.safe_load(out["splitserve/templates/planner/configmap.yaml"])
    return yaml.safe_load(configmap["data"]["policy.yaml"])


def test_planner_reads_the_policy_the_chart_renders(chart):
    policies = load_policies(_rendered_policy(chart, {}))
    defaults = chart.values["planner"]
    for pool in ("prefill", "decode"):
        p = policies[pool]
        assert (p.min_replicas, p.max_replicas) == (defaults[pool]["minReplicas"], defaults[pool]["maxReplicas"])
        assert p.scale_down_cooldown_s == defaults[pool]["scaleDownCooldownSeconds"]
    assert {t.signal: (t.high, t.low) for t in policies["decode"].targets} == {
        "kv_cache_utilization": (0.85, 0.4), "itl_p90_seconds": (0.1, 0.04)}
    custom = _rendered_policy(chart, {"prefill": {"minReplicas": 2, "maxReplicas": 16,
                                                  "targets": {"runningPerReplica": {"high": 64, "low": 8}}}})
    p = load_policies(custom)["prefill"]
    assert (p.min_replicas, p.max_replicas) == (2, 16)
    assert {t.signal for t in p.targets} == {"running_per_replica", "waiting_per_replica", "ttft_p90_seconds"}


def test_planner_deployment_runs_the_planner_on_this_release(chart):
    out = chart.render({"planner": {"enabled": True}}, name="llm", namespace="serving")
    deployment = yaml.safe_load(out["splitserve/templates/planner/deployment.yaml"])
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "splitserve.planner"]
    from splitserve.planner.cli import build_parser

    args = build_parser().parse_args([a.replace("$(POD_NAMESPACE)", "serving") for a in c["args"]])
    assert (args.prefill_deployment, args.decode_deployment) == ("llm-splitserve-prefill", "llm-splitserve-decode")
    assert args.policy == "/etc/splitserve/planner/policy.yaml" and args.metrics_source == "pods"
    assert {"name": "policy", "mountPath": "/etc/splitserve/planner", "readOnly": True} in c["volumeMounts"]
