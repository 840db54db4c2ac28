"""The FP8 settings of each worker pool: --kv-cache-dtype and --quantization, chosen per pool."""
from __future__ import annotations

import pytest
import test_chart_render
from test_chart_render import NAMESPACE, RELEASE, container, flags, render

chart = test_chart_render.chart  # the fixtures of the render tests, shared
schemas_loaded_once = test_chart_render.schemas_loaded_once


def test_defaults_are_the_model_dtype_and_the_checkpoint_quantization(chart):
    manifests = render(chart, {})
    for pool in ("prefill", "decode"):
        args = flags(container(manifests, pool))
        assert args["kv-cache-dtype"] == "auto"
        assert "quantization" not in args  # the checkpoint decides


def test_fp8_is_set_per_pool(chart):
    manifests = render(chart, {"prefill": {"kvCacheDtype": "fp8", "quantization": "fp8"}, "decode": {"kvCacheDtype": "fp8"}})
    prefill, decode = flags(container(manifests, "prefill")), flags(container(manifests, "decode"))
    assert prefill["kv-cache-dtype"] == decode["kv-cache-dtype"] == "fp8"
    assert prefill["quantization"] == "fp8" and "quantization" not in decode
    manifests = render(chart, {"decode": {"quantization": "none"}})
    assert flags(container(manifests, "decode"))["quantization"] == "none"


@pytest.mark.parametrize(("key", "value"), [("kvCacheDtype", "fp16"), ("quantization", "int4")])
def test_unknown_values_are_refused(chart, key, value):
    with pytest.raises(Exception, match=key):
        chart.render({"decode": {key: value}}, name=RELEASE, namespace=NAMESPACE)


def test_host_kv_tier_and_mixed_role_flags(chart):
    manifests = render(chart, {"prefill": {"hostKVCacheMB": 4096}, "decode": {"hostKVCacheMB": 1024, "acceptPrefill": True}})
    prefill, decode = container(manifests, "prefill"), container(manifests, "decode")
    assert flags(prefill)["host-kv-cache-mb"] == "4096" and flags(decode)["host-kv-cache-mb"] == "1024"
    assert "--accept-prefill" in decode["args"] and "--accept-prefill" not in prefill["args"]
    defaults = render(chart, {})
    for component in ("prefill", "decode"):
        c = container(defaults, component)
        assert "host-kv-cache-mb" not in flags(c) and "--accept-prefill" not in c["args"]
    with pytest.raises(Exception, match="only a decode pool"):
        chart.render({"prefill": {"acceptPrefill": True}}, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(Exception, match="hostKVCacheMB"):
        chart.render({"decode": {"hostKVCacheMB": -1}}, name=RELEASE, namespace=NAMESPACE)
