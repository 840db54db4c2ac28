"""Speculative decoding across the hop: a router, a prefill worker and a decode worker that
speculates (n-gram prompt lookup, or a draft model whose KV the decode worker rebuilds for
the prompts that arrive as KV). Greedy output through the public API is transformers' token
for token, the decode worker reports proposals and acceptances, and every block comes back."""
from __future__ import annotations

import random

import pytest

from splitserve.testing.cluster import Cluster, complete_concurrently, wait_until


@pytest.fixture(scope="module", params=["ngram", "draft"])
def cluster(request, e2e_model_dir):
    # The draft is the target itself: its proposals are the target's greedy tokens, so nearly all
    # are accepted if (and only if) its KV, rebuilt here for prompts prefilled elsewhere, is right.
    spec = ["--speculative", request.param, "--num-speculative-tokens", "4"]
    if request.param == "draft":
        spec += ["--draft-model", str(e2e_model_dir)]
    cluster = Cluster(e2e_model_dir, ["--max-tokens-limit", "512"], ["--num-blocks", "256", "--max-num-batched-tokens", "64"])
    cluster.add_workers(("prefill", "prefill-a"), ("decode", "decode-a", spec))
    yield request.param, cluster
    cluster.stop()


def copy_heavy(rng: random.Random, vocab: int) -> list[int]:
    phrase = [rng.randrange(3, vocab) for _ in range(rng.randrange(4, 12))]
    return [rng.randrange(3, vocab) for _ in range(rng.randrange(0, 20))] + phrase * rng.randrange(2, 5)


def test_greedy_streams_are_token_exact_with_speculation(cluster, greedy):
    method, cluster = cluster
    rng = random.Random(5)
    prompts = [copy_heavy(rng, 1000) for _ in range(12)]
    max_tokens = [rng.randrange(2, 40) for _ in prompts]
    results = complete_concurrently(cluster.address, prompts, max_tokens)
    for prompt, m, result in zip(prompts, max_tokens, results):
        assert result.token_ids == greedy(prompt, m)
        assert result.completion_tokens == m and result.finish_reason == "length"
    decode = next(w for w in cluster.workers if w.role == "decode")

    def settled() -> bool:
        return all(s.num_free_blocks == s.num_total_blocks and not s.num_running for s in (w.stats() for w in cluster.workers))

    assert wait_until(settled), [str(w.stats()) for w in cluster.workers]
    stats = decode.stats()
    assert stats.num_kv_transfers > 0  # the prompts' KV crossed the hop
    assert stats.num_spec_draft_tokens > 0 and stats.num_spec_verifications > 0
    acceptance = stats.num_spec_accepted_tokens / stats.num_spec_draft_tokens
    if method == "draft":
        assert acceptance > 0.95, str(stats)
    else:
        assert stats.num_spec_accepted_tokens > 0, str(stats)


def test_bench_serve_reports_acceptance_per_worker(cluster, tmp_path, capsys):
    """``bench serve --worker-metrics``: each point prints and records the decode worker's
    acceptance rate and mean accepted length, the increments of its counters over the point."""
    import json

    from splitserve.bench.serve import main

    _, cluster = cluster
    decode = next(w for w in cluster.workers if w.role == "decode")
    url = f"http://127.0.0.1:{decode.metrics_port}/metrics"
    before = decode.stats()
    code = main([
        "--target", cluster.address, "--num-prompts", "8", "--input-len", "24", "--output-len", "24", "--prefix-len", "24",
        "--worker-metrics", url, "--out", str(tmp_path), "--no-plots", "--disable-tqdm",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Speculative decoding (per decode worker):" in printed and "acceptance rate" in printed
    after = decode.stats()
    recorded = json.loads((tmp_path / "splitserve.json").read_text())["speculative_decoding"]
    (point,) = recorded.values()
    counts = point[url]
    assert counts["num_draft_tokens"] == after.num_spec_draft_tokens - before.num_spec_draft_tokens > 0
    assert counts["num_accepted_tokens"] == after.num_spec_accepted_tokens - before.num_spec_accepted_tokens
    assert counts["acceptance_rate"] == pytest.approx(counts["num_accepted_tokens"] / counts["num_draft_tokens"])
    assert counts["mean_accepted_length"] == pytest.approx(1 + counts["num_accepted_tokens"] / counts["num_drafts"])


def test_a_draft_of_another_vocabulary_is_refused_in_one_line(cluster, tiny_checkpoint):
    import subprocess
    import sys

    method, cluster = cluster
    if method != "draft":
        pytest.skip("the draft model's check; the n-gram cluster has none")
    args = [sys.executable, "-m", "splitserve.cli", "decode", "--model", str(cluster.model_dir), "--port", "0", "--metrics-port", "-1",
            "--control-plane", cluster.control_plane, "--speculative", "draft", "--draft-model", str(tiny_checkpoint("qwen3"))]
    result = subprocess.run(args, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: draft model: vocabulary of 1088 tokens, the target's has 1024"
