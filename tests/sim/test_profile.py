"""Profiles: the fits recover known models, the file round-trips, and ``splitserve profile``
measures a real (tiny) model on the CPU."""
from __future__ import annotations

import json

import pytest

from splitserve.cli import main as cli_main
from splitserve.profile.schema import Profile
from splitserve.profile.step_model import StepModel, TransferModel, causal_pairs, fit, fit_transfer
from sim_profiles import SHAPE

KNOWN = StepModel(weight_ms=4.0, seq_ms=0.01, kv_ms_per_token=3e-5, compute_base_ms=0.5, token_ms=0.025, pair_ms=1e-6)


def test_fit_recovers_a_known_step_model():
    decode = [(b, c, KNOWN.decode_ms(b, c)) for b in (1, 16, 64, 256) for c in (512, 4096)]
    prefill = [(n, c, KNOWN.prefill_ms(n, c)) for n in (256, 1024, 2048, 4096, 8192) for c in (0, 2048)]
    model = fit(decode, prefill)
    for name, value in KNOWN.to_dict().items():
        assert getattr(model, name) == pytest.approx(value, rel=1e-6, abs=1e-12), name


def test_fit_ignores_memory_bound_prefills_for_the_compute_side():
    # Short prefills take the weights' read time; fitting them as compute would inflate the constant.
    decode = [(b, 1024, KNOWN.decode_ms(b, 1024)) for b in (1, 64)] + [(1, 32768, KNOWN.decode_ms(1, 32768))]
    prefill = [(n, 0, KNOWN.prefill_ms(n)) for n in (16, 64, 2048, 4096, 8192)]
    linear = KNOWN.weight_ms + KNOWN.seq_ms  # the weights' read, not the matmuls, bounds 16 tokens
    assert KNOWN.prefill_ms(16) == pytest.approx(linear + KNOWN.kv_ms_per_token * 16 + KNOWN.pair_ms * 136)
    model = fit(decode, prefill)
    assert model.prefill_ms(4096) == pytest.approx(KNOWN.prefill_ms(4096), rel=1e-6)
    assert model.compute_base_ms == pytest.approx(KNOWN.compute_base_ms, rel=1e-6)


def test_fit_needs_both_kinds():
    with pytest.raises(ValueError, match="at least one decode and one prefill"):
        fit([], [(16, 0, 1.0)])


def test_causal_pairs_of_chunks_add_up_to_the_whole_prompt():
    assert causal_pairs(256, 0) + causal_pairs(256, 256) + causal_pairs(488, 512) == causal_pairs(1000, 0) == 500500


def test_fit_transfer_recovers_latency_and_bandwidth():
    known = TransferModel(0.07, 350.0)
    points = [(b, known.transfer_ms(b)) for b in (2**20, 64 * 2**20, 2**30)]
    model = fit_transfer(points)
    assert model.latency_ms == pytest.approx(0.07, rel=1e-6)
    assert model.gb_per_s == pytest.approx(350.0, rel=1e-6)


def test_negative_coefficients_are_refused():
    with pytest.raises(ValueError, match="token_ms"):
        StepModel(1.0, 0.0, 0.0, 0.0, -0.1, 0.0)


def test_profile_file_round_trips_and_refuses_other_schemas(tmp_path):
    profile = Profile.fitted(
        prefill=[(n, 0, KNOWN.prefill_ms(n)) for n in (2048, 4096, 8192)],
        decode=[(b, 1024, KNOWN.decode_ms(b, 1024)) for b in (1, 64, 256)],
        transfer=[(2**20, 0.1), (2**26, 0.3)], device="test", model=SHAPE, tp_size=1, block_size=16, transport="test",
    )
    path = tmp_path / "p.json"
    profile.save(path)
    assert Profile.load(path) == profile
    assert profile.kv_bytes(17) == 32 * SHAPE.kv_bytes_per_token  # whole blocks move
    data = json.loads(path.read_text())
    data["schema"] = "something/2"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a splitserve.profile/1 profile"):
        Profile.load(path)
    del data["decode"]
    data["schema"] = "splitserve.profile/1"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="malformed profile"):
        Profile.load(path)


def test_splitserve_profile_measures_the_tiny_model_on_cpu(llama_tiny_dir, tmp_path, capsys):
    out = tmp_path / "tiny.json"
    rc = cli_main(["profile", "--model", str(llama_tiny_dir), "--prefill-tokens", "16,128", "--decode-batches", "1,4",
                   "--decode-contexts", "32,64", "--transfer-blocks", "1,8", "--iters", "2", "--warmup", "1",
                   "--out", str(out)])
    assert rc == 0
    profile = Profile.load(out)
    assert profile.source == "measured" and profile.device == "cpu"
    assert [(n, c) for n, c, _ in profile.prefill] == [(16, 0), (128, 0)]
    assert [(b, c) for b, c, _ in profile.decode] == [(1, 32), (4, 32), (1, 64), (4, 64)]
    assert [b for b, _ in profile.transfer] == [profile.kv_bytes(16), 8 * profile.kv_bytes(16)]
    assert all(ms > 0 for *_, ms in (*profile.prefill, *profile.decode, *profile.transfer))
    assert profile.model.kv_bytes_per_token > 0
    assert "splitserve profile --model" in profile.notes
    assert "wrote" in capsys.readouterr().out


def test_splitserve_profile_refuses_a_bad_grid(llama_tiny_dir, tmp_path, capsys):
    rc = cli_main(["profile", "--model", str(llama_tiny_dir), "--decode-batches", "0", "--out", str(tmp_path / "x.json")])
    assert rc == 2
    assert "decode_batches" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
