"""Worker start-to-ready and sleep/wake latency, through the real CLI processes.

Starts a router, then a decode worker several times over, each time timing its process start
to its ready line (weights loaded, KV cache allocated, kernels compiled, decode graphs
captured, registered), the warm-up's share of it (from the worker's own log line), and the
first request's time to last token after ready. Configurations, in order:

  cold-cache   Triton's kernel cache empty (TRITON_CACHE_DIR a new directory): every kernel compiled
  warm-cache   the same cache directory again: compiled kernels come from disk
  lazy-graphs  warm cache and --lazy-graphs: decode graphs captured when first needed

After the last start it times Sleep and Wake over gRPC at levels 1 and 2 (Wake's own figure is
the engine's part: cache back, weights copied back or reloaded, graphs recaptured).

    python bench/cold_start.py --model /tmp/llama8b --device cuda --out $OUT/cold_start.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from splitserve.client import Client
from splitserve.v1 import worker_pb2 as worker_pb
from splitserve.v1 import worker_pb2_grpc

READY = re.compile(r"splitserve (\w+) listening on (\S+)")
WARM_UP = re.compile(r"warm-up: .* in ([0-9.]+) s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, args: list[str], env: dict, log: Path) -> None:
        self.start = time.perf_counter()
        self.lines: list[str] = []
        self.ready_at: float | None = None
        self.address: str | None = None
        self.log = log.open("w")
        self.p = subprocess.Popen([sys.executable, "-m", "splitserve.cli", *args], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.p.stdout:
            self.log.write(line)
            self.lines.append(line)
            m = READY.search(line)
            if m and self.ready_at is None:
                self.ready_at, self.address = time.perf_counter(), m.group(2)

    def wait_ready(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while self.ready_at is None:
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("".join(self.lines[-30:]))
            time.sleep(0.05)
        return self.ready_at - self.start

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--worker-args", default="", help="extra decode worker arguments, space-separated")
    p.add_argument("--configs", default="cold-cache,warm-cache,lazy-graphs")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    logs = args.out.parent
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NIXL_LOG_LEVEL": "WARN"}
    router_port = free_port()
    router = Proc(["router", "--model", args.model, "--port", str(router_port), "--http-port", "-1", "--metrics-port", "-1"],
                  env, logs / "cold_start-router.log")
    router.wait_ready(120)
    triton_cache = tempfile.mkdtemp(prefix="triton-cache-")
    results: dict = {"model": args.model, "configs": {}}
    prompt = list(range(100, 612))
    worker = None
    for config in args.configs.split(","):
        extra = args.worker_args.split() + (["--lazy-graphs"] if config == "lazy-graphs" else [])
        worker_env = {**env, "TRITON_CACHE_DIR": triton_cache}
        worker = Proc(["decode", "--model", args.model, "--device", args.device, "--port", "0", "--metrics-port", "-1",
                       "--worker-id", "decode-0", "--control-plane", f"grpc://127.0.0.1:{router_port}", *extra],
                      worker_env, logs / f"cold_start-{config}.log")
        ready_s = worker.wait_ready(args.timeout)
        warm = next((float(m.group(1)) for line in worker.lines if (m := WARM_UP.search(line))), None)
        client = Client(f"127.0.0.1:{router_port}")
        time.sleep(1.0)  # the router's list catches up
        t0 = time.perf_counter()
        client.complete(prompt, max_tokens=128, ignore_eos=True, timeout=300)
        first_request_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        client.complete(prompt[::-1], max_tokens=128, ignore_eos=True, timeout=300)
        second_request_s = time.perf_counter() - t0
        client.close()
        results["configs"][config] = {"start_to_ready_s": ready_s, "warm_up_s": warm, "first_request_s": first_request_s,
                                      "second_request_s": second_request_s}
        print(config, results["configs"][config], flush=True)
        if config != args.configs.split(",")[-1]:
            worker.stop()
    stub = worker_pb2_grpc.DecodeWorkerStub(grpc.insecure_channel(worker.address))
    for level in (1, 2):
        t0 = time.perf_counter()
        slept = stub.Sleep(worker_pb.SleepRequest(level=level, drain_seconds=5), timeout=600)
        sleep_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        woken = stub.Wake(worker_pb.WakeRequest(), timeout=900)
        wake_s = time.perf_counter() - t0
        results[f"sleep_level_{level}"] = {"sleep_rpc_s": sleep_s, "sleep_engine_s": slept.seconds, "wake_rpc_s": wake_s,
                                           "wake_engine_s": woken.seconds}
        print(f"level {level}", results[f"sleep_level_{level}"], flush=True)
    worker.stop()
    router.stop()
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
