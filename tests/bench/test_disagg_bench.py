"""``bench/disagg.py`` and ``bench/disagg_report.py`` for real on the CPU: both setups start,
every point's requests succeed, the KV-transfer scrape counts one transfer per request that
went through the prefill worker (and none colocated), and the report compares the two."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
WARMUPS = 2  # bench/disagg.py sends two unrecorded requests before each point


def test_disaggregated_and_colocated_points_and_report(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, str(REPO / "bench" / "disagg.py"), "--model", str(tiny_checkpoint("llama")),
        "--devices", "cpu", "cpu", "--workloads", "prefill_heavy", "--rates", "prefill_heavy=20",
        "--scale", "0.02", "--seconds-per-point", "0.5", "--worker-args", "--num-blocks 256", "--out", str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    rows = {row["setup"]: row for row in summary["rows"]}
    assert set(rows) == {"disagg", "coloc"}
    for row in rows.values():
        assert row["completed"] == row["num_prompts"] and row["failed"] == 0
        assert row["p99_ttft_ms"] >= row["p50_ttft_ms"] > 0
    assert rows["disagg"]["kv_transfers"] == rows["disagg"]["num_prompts"] + WARMUPS
    # The transfer follows the first token (streamed from the prefill worker): not bounded by TTFT.
    assert rows["disagg"]["mean_kv_transfer_ms"] > 0 and rows["disagg"]["kv_share_of_ttft"] > 0
    assert rows["coloc"]["kv_transfers"] == 0 and rows["coloc"]["mean_kv_transfer_ms"] is None

    report = subprocess.run(
        [sys.executable, str(REPO / "bench" / "disagg_report.py"), str(out), "--slo", "ttft:500,tpot:25", "--slo", "ttft:1,tpot:1"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert report.returncode == 0, report.stderr
    text = (out / "report.md").read_text()
    assert "| disaggregated | 20 |" in text and "| colocated | 20 |" in text
    assert "disaggregated / colocated = " in text
    assert (out / "prefill_heavy.png").stat().st_size > 10_000
    # At an SLO nothing can meet, goodput recomputed from the records is zero for both.
    nothing = "best goodput at ttft<=1 ms, tpot<=1 ms: colocated 0.00 req/s (at rate 20), disaggregated 0.00 req/s (at rate 20)"
    assert nothing in text, text
