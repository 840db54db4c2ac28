"""Per-request placement in a real router with real CPU workers: the router's choice shows in
where the prompt was computed (the workers' own counters) and in its placement metric.

The profile is written by the test with chosen times (1 ms per prompt token, a 50 ms ITL
SLO), so the decisions follow from the workers' state, not from this machine's speed."""
from __future__ import annotations

import urllib.request

import pytest

from splitserve.client import Client
from splitserve.profile.schema import ModelShape, Profile
from splitserve.profile.step_model import StepModel, TransferModel
from splitserve.testing.cluster import Cluster, wait_until

PROMPT = list(range(3, 203))  # 200 tokens: 200 ms of prefill by the profile, above the 50 ms ITL SLO


def profile_file(folder) -> str:
    """A profile of round numbers: 1 ms per prompt token, 1 ms of weights per step, 5 ms + 1 ms/MB per transfer."""
    profile = Profile(
        source="derived", device="test", model=ModelShape("tiny", 2, 1, 8, "float32", 64), tp_size=1, block_size=16,
        transport="test", prefill=(), decode=(), transfer=(),
        step_model=StepModel(weight_ms=1.0, seq_ms=0.0, kv_ms_per_token=0.0, compute_base_ms=0.0, token_ms=1.0, pair_ms=0.0),
        transfer_model=TransferModel(5.0, 1.0),
    )
    path = folder / "profile.json"
    profile.save(path)
    return str(path)


@pytest.fixture(scope="module")
def cluster(e2e_model_dir, tmp_path_factory):
    path = profile_file(tmp_path_factory.mktemp("placement"))
    cluster = Cluster(e2e_model_dir, ["--placement-profile", str(path), "--placement-slo", "ttft:500,itl:50"],
                      ["--num-blocks", "512"])
    try:
        cluster.add_workers(("prefill", "prefill-0"), ("decode", "decode-0"))
        yield cluster
    finally:
        cluster.stop()


def _placements(cluster: Cluster) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{cluster.router.metrics_port}/metrics", timeout=10).read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("splitserve_placements_total{"):
            labels = dict(kv.split("=") for kv in line[line.index("{") + 1 : line.index("}")].split(","))
            counts[(labels["where"].strip('"'), labels["reason"].strip('"'))] = float(line.rsplit(" ", 1)[1])
    return counts


def _computed(cluster: Cluster, role: str) -> int:
    return sum(w.stats().num_prompt_tokens_computed for w in cluster.workers if w.role == role)


def test_idle_decode_worker_prefills_the_prompt_itself(cluster):
    client = Client(cluster.address)
    try:
        wait_until(lambda: len(client.model_info().model) > 0, timeout=30)
        out = client.complete(PROMPT, max_tokens=4, ignore_eos=True, timeout=120)
    finally:
        client.close()
    assert len(out.token_ids) == 4
    # Same prefill time on either side; remote would add the KV transfer before token two.
    assert _placements(cluster) == {("local", "itl"): 1.0}
    assert _computed(cluster, "prefill") == 0
    assert _computed(cluster, "decode") >= len(PROMPT)


def test_busy_decode_worker_sends_a_long_prompt_remote(cluster):
    client = Client(cluster.address)
    try:
        before_prefill = _computed(cluster, "prefill")
        # A long generation keeps the decode worker's batch busy (the router counts it in flight).
        running = client.stream(list(range(300, 320)), max_tokens=400, ignore_eos=True, timeout=300)
        next(iter(running))
        out = client.complete(PROMPT, max_tokens=4, ignore_eos=True, timeout=120)
        running.cancel()
    finally:
        client.close()
    assert len(out.token_ids) == 4
    placements = _placements(cluster)
    # The prompt in the running request's steps would stall it 200 ms: prefill remotely.
    assert placements.get(("remote", "itl")) == 1.0
    assert placements.get(("local", "itl")) == 2.0  # the first test's and the long generation's
    assert _computed(cluster, "prefill") - before_prefill >= len(PROMPT)
