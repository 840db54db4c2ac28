"""Where `splitserve up` places its workers (splitserve.up_layout), as a pure rule."""
from __future__ import annotations

import pytest

from splitserve.up_layout import COLOCATED, DISAGGREGATED, plan_layout


def _util(plan) -> float:
    return float(plan.args[plan.args.index("--gpu-memory-utilization") + 1])


def test_one_gpu_splits_its_kv_memory_between_prefill_and_decode_on_purpose():
    layout = plan_layout(DISAGGREGATED, "cuda", prefill_memory_share=0.2, gpu_memory_utilization=0.9)
    prefill, decode = layout.workers
    assert (prefill.role, decode.role) == ("prefill", "decode")  # prefill first: decode sizes from what it left
    assert _util(prefill) == pytest.approx(0.18)
    # Of 100 GiB free: prefill takes 18, decode 0.878 of the 82 left: 72; together the 90 asked for.
    assert 100 * _util(prefill) + (100 - 100 * _util(prefill)) * _util(decode) == pytest.approx(90, abs=0.01)
    assert "one GPU (cuda:0)" in layout.description and "20%/80%" in layout.description
    assert plan_layout(DISAGGREGATED, "cuda:1", decode_device="cuda:1").workers[1].args  # the same GPU named twice


def test_two_gpus_each_take_the_default_share_of_their_own():
    layout = plan_layout(DISAGGREGATED, "cuda", prefill_device="cuda:0", decode_device="cuda:1")
    assert [(w.role, w.device, w.args) for w in layout.workers] == [("prefill", "cuda:0", ()), ("decode", "cuda:1", ())]
    assert layout.description == "disaggregated: prefill on cuda:0, decode on cuda:1"


def test_colocated_is_one_worker_and_the_cpu_needs_no_split():
    (worker,) = plan_layout(COLOCATED, "cuda").workers
    assert (worker.role, worker.device, worker.args) == ("decode", "cuda", ())
    assert [w.args for w in plan_layout(DISAGGREGATED, "cpu").workers] == [(), ()]
    with pytest.raises(ValueError, match="prefill_memory_share"):
        plan_layout(DISAGGREGATED, "cuda", prefill_memory_share=1.0)
