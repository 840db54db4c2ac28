"""`splitserve up --mode colocated`: a router and one worker that prefills and decodes."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

from splitserve.client import Client

READY = re.compile(r"splitserve router listening on (\S+) .*colocated: one worker prefills and decodes on cpu")


def test_up_colocated_runs_one_worker_that_prefills_and_decodes(e2e_model_dir, greedy):
    cmd = [sys.executable, "-m", "splitserve.cli", "up", "--mode", "colocated", "--model", str(e2e_model_dir),
           "--port", "0", "--http-port", "-1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "NIXL_LOG_LEVEL": "WARN"})
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if READY.search(line):
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        ready.wait(300)
        match = next((m for m in map(READY.search, lines) if m), None)
        assert match is not None, "".join(lines[-40:])
        prompt = list(range(3, 60))
        assert Client(match.group(1)).complete(prompt, max_tokens=5, ignore_eos=True, timeout=60).token_ids == greedy(prompt, 5)
        assert not any(line.startswith("[prefill]") for line in lines)  # no prefill worker was started
        assert sum(line.startswith("[decode] ready at") for line in lines) == 1
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            assert proc.wait(timeout=90) == 0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
