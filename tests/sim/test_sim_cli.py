"""``splitserve sim`` end to end, and the workload it replays being bench serve's own."""
from __future__ import annotations

import json

import numpy as np
import pytest

from splitserve.bench.client import ModelInfo
from splitserve.bench.config import DatasetConfig
from splitserve.bench.loadgen import arrival_offsets
from splitserve.bench.metrics import compute_metrics
from splitserve.bench.records import RequestRecord
from splitserve.bench.serve import build_requests
from splitserve.cli import main as cli_main
from splitserve.sim.run import parse_layout
from splitserve.sim.workload import WorkloadSpec, bench_requests
from sim_profiles import make_profile
from splitserve.profile.step_model import StepModel, TransferModel


def test_replayed_workload_is_what_bench_serve_sends():
    spec = WorkloadSpec(40, 512, 64, request_rate=8.0, range_ratio=0.5, prefix_len=64, num_prefixes=4, seed=3,
                        vocab_size=1000, excluded_token_ids=(2,))
    sim = bench_requests(spec)
    data_seeds, arrival_seed = np.random.SeedSequence(3).spawn(2)
    info = ModelInfo("m", "llama", 4096, 1000, (2,), 0, 16)
    sent = build_requests(DatasetConfig("random", 40, 512, 64, 0.5, 64, 4), info, data_seeds)
    offsets = arrival_offsets(40, 8.0, 1.0, np.random.default_rng(arrival_seed))
    assert [(r.prompt_len, r.output_len, r.prefix_id) for r in sim] == [(r.prompt_len, r.output_len, r.prefix_id) for r in sent]
    assert [r.arrival_s for r in sim] == list(offsets)
    assert sim[-1].arrival_s == pytest.approx(40 / 8.0)


@pytest.mark.parametrize("text, expected", [("1P1D", (1, 1)), ("3p1d", (3, 1)), ("0P2D", (0, 2)), ("4C", (0, 4))])
def test_parse_layout(text, expected):
    assert parse_layout(text) == expected


@pytest.mark.parametrize("text", ["1P0D", "0C", "2X", "P1D", ""])
def test_parse_layout_refuses(text):
    with pytest.raises(ValueError, match="layout"):
        parse_layout(text)


def test_sim_cli_writes_bench_serve_results(tmp_path, capsys):
    profile = tmp_path / "p.json"
    make_profile(StepModel(2.0, 0.01, 1e-5, 0.0, 0.02, 1e-7), TransferModel(0.1, 100.0)).save(profile)
    rc = cli_main(["sim", "--layout", "1P1D", "--profile", str(profile), "--num-prompts", "30", "--input-len", "300",
                   "--output-len", "20", "--request-rate", "5,inf", "--goodput", "ttft:100", "tpot:5", "--out", str(tmp_path),
                   "--label", "run", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "placements remote=30, KV transfers 30" in out
    doc = json.loads((tmp_path / "run.json").read_text())
    assert doc["schema"] == "splitserve.bench.serve/1" and doc["config"]["simulated"] is True
    assert [p["label"] for p in doc["points"]] == ["rate=5", "rate=inf"]
    for point in doc["points"]:
        records = [RequestRecord.from_dict(r) for r in point["records"]]
        assert len(records) == 30 and all(len(r.chunk_times) == 20 for r in records)
        again = compute_metrics(records, point["metrics"]["duration"], (50.0, 90.0, 99.0), {"ttft": 100.0, "tpot": 5.0})
        assert again.to_dict() == point["metrics"]
    # All at once queues the prompts behind each other: a worse TTFT than at 5 req/s.
    assert doc["points"][1]["metrics"]["mean_ttft_ms"] > doc["points"][0]["metrics"]["mean_ttft_ms"]


def test_sim_cli_adaptive_counts_its_decisions(tmp_path, capsys):
    profile = tmp_path / "p.json"
    make_profile(StepModel(2.0, 0.01, 1e-5, 0.0, 0.02, 1e-7), TransferModel(0.1, 100.0)).save(profile)
    rc = cli_main(["sim", "--layout", "1P1D", "--profile", str(profile), "--num-prompts", "20", "--input-len", "100",
                   "--output-len", "5", "--request-rate", "2", "--placement", "adaptive", "--quiet"])
    assert rc == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "placements" in l)
    counts = dict(item.split("=") for item in line.split("placements ")[1].split(", KV")[0].split(", "))
    assert sum(map(int, counts.values())) == 20 and all(k.split(":")[0] in ("local", "remote") for k in counts)


@pytest.mark.parametrize("args, message", [
    (["--layout", "1X"], "layout"),
    (["--layout", "1P1D", "--placement", "adaptive", "--placement-slo", "ttft:500"], "ttft:MS,itl:MS"),
    (["--layout", "1P1D", "--range-ratio", "1.5"], "range_ratio"),
])
def test_sim_cli_refuses_bad_arguments(tmp_path, capsys, args, message):
    profile = tmp_path / "p.json"
    make_profile(StepModel(2.0, 0.0, 0.0, 0.0, 0.0, 0.0)).save(profile)
    assert cli_main(["sim", "--profile", str(profile), *args]) == 2
    assert message in capsys.readouterr().err


def test_sim_cli_refuses_a_missing_profile(tmp_path, capsys):
    assert cli_main(["sim", "--layout", "1C", "--profile", str(tmp_path / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err


def test_plan_ranks_every_layout_of_the_gpus(tmp_path, capsys):
    profile = tmp_path / "p.json"
    make_profile(StepModel(2.0, 0.01, 1e-5, 0.0, 0.05, 1e-7), TransferModel(0.1, 100.0)).save(profile)
    rc = cli_main(["sim", "--plan-gpus", "3", "--profile", str(profile), "--input-len", "600", "--output-len", "8",
                   "--request-rate", "20,40", "--seconds-per-rate", "2", "--goodput", "ttft:200", "tpot:20"])
    assert rc == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert sorted(r[0] for r in rows) == sorted(["3C", "1P2D", "1P2D-adaptive", "2P1D", "2P1D-adaptive"])
    goodputs = [float(r[1]) for r in rows]
    assert goodputs == sorted(goodputs, reverse=True) and goodputs[0] > 0


def test_plan_needs_slos(tmp_path, capsys):
    profile = tmp_path / "p.json"
    make_profile(StepModel(2.0, 0.0, 0.0, 0.0, 0.0, 0.0)).save(profile)
    assert cli_main(["sim", "--plan-gpus", "2", "--profile", str(profile)]) == 2
    assert "SLOs" in capsys.readouterr().err
