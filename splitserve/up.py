"""`splitserve up`: router, one prefill and one decode worker as processes on this machine.

Workers register with the router's embedded control plane, so nothing else
needs to be installed or running. Ctrl-C (or SIGTERM) stops all three.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from splitserve.cli import DEMO_DIR

READY = re.compile(r"splitserve (\w+) listening on (\S+)")


def _start(args: list[str], name: str, timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """Starts a service and waits for its ready line; its later output is echoed with a prefix."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitserve.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Ctrl-C reaches us; we stop the children in order
    )
    ready = threading.Event()
    found: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            match = READY.search(line)
            if match and not ready.is_set():
                found.append(match.group(2))
                ready.set()
                line = f"ready at {match.group(2)}\n"  # the whole platform's ready line comes last
            sys.stdout.write(f"[{name}] {line}")
            sys.stdout.flush()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(timeout)
    if not found:
        proc.kill()
        raise RuntimeError(f"{name} did not start (exit code {proc.poll()})")
    return proc, found[0]


def demo_checkpoint() -> Path:
    from splitserve.models.checkpoint_init import init_checkpoint

    if not (DEMO_DIR / "config.json").is_file():
        init_checkpoint(DEMO_DIR, "llama", "tiny", overwrite=True)
    return DEMO_DIR


def run_up(args) -> int:
    model = args.model
    if model is None:
        model = demo_checkpoint()
        print(f"no --model given: using a RANDOM-WEIGHT demo checkpoint at {model} (its text is meaningless)", flush=True)
    procs: list[subprocess.Popen] = []
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        router, address = _start(
            ["router", "--model", str(model), "--host", args.host, "--port", str(args.port), "--metrics-port", "0",
             "--prefill-threshold", str(args.prefill_threshold)],
            "router",
        )
        procs.append(router)
        common = ["--model", str(model), "--host", args.host, "--port", "0", "--metrics-port", "0",
                  "--device", args.device, "--control-plane", f"grpc://{address}"]
        for role in ("prefill", "decode"):
            proc, _ = _start([role, *common, "--worker-id", f"{role}-0"], role)
            procs.append(proc)
        print(f"splitserve router listening on {address} (gRPC splitserve.v1.Generation; prefill and decode ready). Ctrl-C stops it.", flush=True)
        while not stop.is_set() and all(p.poll() is None for p in procs):
            stop.wait(0.5)
        failed = [p for p in procs if p.poll() not in (None, 0)]
        return 1 if failed else 0
    finally:
        for proc in reversed(procs):  # workers drain first, the router last
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
