"""`splitserve up --mode colocated`: a router and one worker that prefills and decodes."""
from __future__ import annotations

import re

from splitserve.client import Client
from splitserve.testing.cluster import UpProcess

READY = re.compile(r"splitserve router listening on (\S+) .*colocated: one worker prefills and decodes on cpu")


def test_up_colocated_runs_one_worker_that_prefills_and_decodes(e2e_model_dir, greedy):
    up = UpProcess(["--mode", "colocated", "--model", str(e2e_model_dir), "--port", "0", "--http-port", "-1"])
    try:
        match = up.wait_for(READY)
        prompt = list(range(3, 60))
        assert Client(match.group(1)).complete(prompt, max_tokens=5, ignore_eos=True, timeout=60).token_ids == greedy(prompt, 5)
        assert not any(line.startswith("[prefill]") for line in up.lines)  # no prefill worker was started
        assert sum(line.startswith("[decode] ready at") for line in up.lines) == 1
    finally:
        assert up.stop() == 0
