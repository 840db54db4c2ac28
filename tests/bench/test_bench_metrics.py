"""Metric definitions on hand-made timestamps, against values computed by hand."""
from __future__ import annotations

import math

import pytest

from splitserve.bench.metrics import compute_metrics, itls, meets_slos, parse_goodput, tpot, ttft
from splitserve.bench.records import RequestRecord, Usage


def ok(index: int, send: float, chunks: list[tuple[float, int]], prompt: int, completion: int | None = None) -> RequestRecord:
    times, counts = zip(*chunks)
    completion = sum(counts) if completion is None else completion
    return RequestRecord(
        index=index, request_id=f"r{index}", send_time=send, chunk_times=times, chunk_num_tokens=counts,
        end_time=times[-1] + 0.001, prompt_len=prompt, max_tokens=completion, usage=Usage(prompt, completion, 0),
        finish_reason="length", error_code=None,
    )


def failed(index: int, code: str, chunks: list[tuple[float, int]] = ()) -> RequestRecord:
    times, counts = zip(*chunks) if chunks else ((), ())
    return RequestRecord(
        index=index, request_id=f"r{index}", send_time=0.12, chunk_times=times, chunk_num_tokens=counts,
        end_time=0.6, prompt_len=7, max_tokens=8, usage=None, finish_reason=None, error_code=code, error_message="boom",
    )


# A: 5 tokens in 4 chunks, one of them carrying 2 tokens.
A = ok(0, 0.00, [(0.10, 1), (0.15, 1), (0.25, 2), (0.30, 1)], prompt=10)
# B: 4 tokens in 2 chunks; the second carries 3.
B = ok(1, 0.05, [(0.25, 1), (0.45, 3)], prompt=20)
# C: a single token: a TTFT but no TPOT and no ITL.
C = ok(2, 0.10, [(0.50, 1)], prompt=30)
# D: rejected; E: timed out after streaming a token. Neither counts towards anything but failures.
D = failed(3, "INVALID_ARGUMENT")
E = failed(4, "DEADLINE_EXCEEDED", [(0.30, 1)])
RECORDS = [A, B, C, D, E]


def test_per_request_definitions() -> None:
    assert ttft(A) == pytest.approx(0.10)
    assert tpot(A) == pytest.approx((0.30 - 0.10) / (5 - 1))  # per token, not per chunk
    assert itls(A) == pytest.approx([0.05, 0.10, 0.05])  # one gap per chunk, as vLLM
    assert ttft(B) == pytest.approx(0.20)
    assert tpot(B) == pytest.approx(0.20 / 3)
    assert itls(B) == pytest.approx([0.20])
    assert tpot(C) is None and itls(C) == []


def test_aggregates_match_hand_computed_values() -> None:
    m = compute_metrics(RECORDS, duration_s=1.0, percentiles=(90, 99))
    assert (m.num_requests, m.completed, m.failed) == (5, 3, 2)
    assert m.failed_by_code == {"DEADLINE_EXCEEDED": 1, "INVALID_ARGUMENT": 1}
    # Only completed requests count, as in vLLM; D's prompt and E's token do not.
    assert (m.total_input_tokens, m.total_output_tokens) == (60, 10)
    assert m.request_throughput == pytest.approx(3.0)
    assert m.output_throughput == pytest.approx(10.0)
    assert m.total_token_throughput == pytest.approx(70.0)
    assert m.request_goodput is None

    # TTFT [100, 200, 400] ms; linear-interpolated percentiles: p90 at rank 1.8 -> 360.
    assert m.ttft_ms.count == 3
    assert m.ttft_ms.mean == pytest.approx(700 / 3)
    assert m.ttft_ms.median == pytest.approx(200)
    assert m.ttft_ms.std == pytest.approx(math.sqrt(140000 / 9))
    assert m.ttft_ms.percentile(90) == pytest.approx(360)
    assert m.ttft_ms.percentile(99) == pytest.approx(396)
    # TPOT [50, 66.67] ms; C has one token and no TPOT.
    assert m.tpot_ms.count == 2
    assert m.tpot_ms.mean == pytest.approx((50 + 200 / 3) / 2)
    assert m.tpot_ms.percentile(90) == pytest.approx(50 + 0.9 * (200 / 3 - 50))
    # ITL pooled over chunks, not tokens: [50, 100, 50] from A and [200] from B, so 4
    # samples, though A and B streamed 9 tokens after their first.
    assert m.itl_ms.count == 4
    assert m.itl_ms.mean == pytest.approx(100)
    assert m.itl_ms.median == pytest.approx(75)
    assert m.itl_ms.percentile(90) == pytest.approx(170)
    assert m.itl_ms.percentile(99) == pytest.approx(197)
    # So with multi-token chunks mean ITL exceeds mean TPOT, by design.
    assert m.itl_ms.mean > m.tpot_ms.mean
    # E2EL ends at the last token chunk: [300, 400, 400].
    assert m.e2el_ms.mean == pytest.approx(1100 / 3)
    assert m.e2el_ms.median == pytest.approx(400)


def test_vllm_style_keys() -> None:
    d = compute_metrics(RECORDS, duration_s=1.0, percentiles=(90, 99.9)).to_dict()
    assert d["completed"] == 3 and d["failed"] == 2 and d["duration"] == 1.0
    assert d["mean_ttft_ms"] == pytest.approx(700 / 3)
    assert {"p90_ttft_ms", "p99.9_ttft_ms", "median_tpot_ms", "std_itl_ms", "p90_e2el_ms"} <= d.keys()
    assert d["num_itl_samples"] == 4


def test_usage_is_preferred_over_streamed_count() -> None:
    # The server says 9 tokens came in 4 chunks: TPOT divides by 8, as vLLM's usage-based count does.
    r = ok(0, 0.0, [(0.1, 1), (0.2, 1), (0.3, 1), (0.5, 1)], prompt=4, completion=9)
    assert tpot(r) == pytest.approx(0.4 / 8)
    assert compute_metrics([r], 1.0).total_output_tokens == 9


def test_goodput_counts_requests_meeting_every_slo() -> None:
    # A: TTFT 100, TPOT 50 -> good. B: TPOT 66.7 > 60 -> not. C: TTFT 400 > 250 -> not.
    m = compute_metrics(RECORDS, duration_s=2.0, slos_ms={"ttft": 250, "tpot": 60})
    assert m.request_goodput == pytest.approx(1 / 2.0)
    # A one-token request counts TPOT as 0, and an SLO is met at equality: only C.
    assert compute_metrics(RECORDS, 1.0, slos_ms={"tpot": 0}).request_goodput == pytest.approx(1.0)
    # Failed requests are never good, however fast.
    assert not meets_slos(D, {"e2el": 1e9})
    assert compute_metrics(RECORDS, 1.0, slos_ms={"e2el": 1e9}).request_goodput == pytest.approx(3.0)


def test_parse_goodput() -> None:
    assert parse_goodput(["ttft:500", "tpot:25", "e2el:3000.5"]) == {"ttft": 500, "tpot": 25, "e2el": 3000.5}
    for bad in (["itl:5"], ["ttft"], ["ttft:fast"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_peaks_use_one_second_buckets() -> None:
    slow = ok(0, 0.0, [(0.5, 1), (1.5, 2), (1.7, 3)], prompt=1)
    fast = ok(1, 1.2, [(1.3, 1), (2.2, 1)], prompt=1)
    m = compute_metrics([slow, fast], duration_s=3.0)
    assert m.max_output_tokens_per_s == 6  # bucket [1, 2): 2 + 3 + 1 tokens
    assert m.max_concurrent_requests == 2  # both touch bucket [1, 2)
    # Exactly: slow is open over [0, 1.701], fast over [1.2, 2.201].
    assert m.max_in_flight_requests == 2
    after = ok(2, fast.end_time, [(2.3, 1)], prompt=1)  # sent as fast's stream closed: a handed-over slot
    assert compute_metrics([slow, fast, after], 3.0).max_in_flight_requests == 2


def test_all_failed_reports_failures_and_no_latencies() -> None:
    m = compute_metrics([D, E], duration_s=1.0)
    assert (m.completed, m.failed, m.request_throughput) == (0, 2, 0.0)
    assert m.ttft_ms is None and m.itl_ms is None
    d = m.to_dict()
    assert d["mean_ttft_ms"] is None and d["num_ttft_samples"] == 0 and "p99_ttft_ms" not in d


def test_records_are_checked() -> None:
    with pytest.raises(ValueError):
        RequestRecord(0, "x", 0.0, (), (), 1.0, 1, 1, None, None, error_code=None)  # success without a token
    with pytest.raises(ValueError):
        RequestRecord(0, "x", 0.5, (0.4,), (1,), 1.0, 1, 1, None, None, error_code=None)  # token before send
    with pytest.raises(ValueError):
        compute_metrics(RECORDS, duration_s=0.0)


def test_record_round_trips_through_dict() -> None:
    for r in RECORDS:
        assert RequestRecord.from_dict(r.to_dict()) == r
    assert A.shifted(-0.1).chunk_times == pytest.approx((0.0, 0.05, 0.15, 0.2))
