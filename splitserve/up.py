"""`splitserve up`: router, one prefill and one decode worker as processes on this machine
(or, with --mode colocated, one worker that does both; where they run: splitserve.up_layout).

Workers register with the router's embedded control plane, so nothing else
needs to be installed or running. Ctrl-C (or SIGTERM) stops all three.
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from splitserve.cli import DEMO_DIR
from splitserve.up_layout import plan_layout

READY = re.compile(r"splitserve (\w+) listening on (\S+)")
HTTP_URL = re.compile(r"OpenAI-compatible HTTP API at (\S+?)[;)]")
METRICS_PORT = re.compile(r"\(metrics on :(\d+)\)")


class ServiceStartError(Exception):
    """A service refused to start over a mistake the user can fix (its one-line error, exit status 2)."""


def _start(args: list[str], name: str, timeout: float = 300.0) -> tuple[subprocess.Popen, str, str]:
    """Starts a service and waits for its ready line (returned with its address); later output is echoed with a prefix.

    A service that exits at once with its one-line error (a port in use, a bad checkpoint)
    raises ServiceStartError with that line, which `up` prints once, on stderr.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitserve.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Ctrl-C reaches us; we stop the children in order
    )
    ready = threading.Event()
    found: list[str] = []
    errors: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            if line.startswith("error: ") and not ready.is_set():
                errors.append(line.removeprefix("error: ").strip())
                continue
            match = READY.search(line)
            first_ready = match is not None and not ready.is_set()
            # the whole platform's ready line comes last, so ours is written before anyone is told
            sys.stdout.write(f"[{name}] ready at {match.group(2)}\n" if first_ready else f"[{name}] {line}")
            sys.stdout.flush()
            if first_ready:
                found.extend([match.group(2), line])
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(timeout)
    if not found:
        proc.kill()
        code = proc.wait()
        if code == 2 and errors:
            raise ServiceStartError(f"{name}: {errors[-1]}")
        raise RuntimeError(f"{name} did not start (exit code {code})")
    return proc, found[0], found[1]


def _endpoints(name: str, address: str, ready_line: str) -> str:
    """One line naming what a process opened: gRPC, the HTTP API (router), Prometheus metrics."""
    parts = [f"  {name:<8} gRPC {address}"]
    if (http := HTTP_URL.search(ready_line)) is not None:
        parts.append(f"HTTP {http.group(1)}")
    if (metrics := METRICS_PORT.search(ready_line)) is not None:
        # a metrics port picked at random is bound to loopback (services/grpc_server.py)
        parts.append(f"metrics http://127.0.0.1:{metrics.group(1)}/metrics")
    return "  ".join(parts)


def demo_checkpoint() -> Path:
    """The checkpoint `up` serves without --model, written on first use. init_checkpoint
    renames a finished folder into place, so DEMO_DIR is whole or absent; one left half
    written by an older release (config.json, no weights or tokenizer) is written again."""
    from splitserve.models.checkpoint_init import init_checkpoint

    needed = ("config.json", "tokenizer.json", "tokenizer_config.json")
    if not (all((DEMO_DIR / name).is_file() for name in needed) and any(DEMO_DIR.glob("*.safetensors"))):
        print(f"writing the random-weight demo checkpoint to {DEMO_DIR} (once; a few seconds)...", flush=True)
        init_checkpoint(DEMO_DIR, "llama", "tiny", overwrite=True)
    return DEMO_DIR


def _worker_keys_file(folder: Path) -> Path:
    """A fresh worker key for this platform: the workers' credential towards the router and each
    other, never given to clients (the clients' keys open the public APIs only)."""
    path = folder / "worker-keys"
    path.touch(mode=0o600)
    path.write_text(secrets.token_urlsafe(32) + "\n")
    return path


def _security_args(args, worker_keys: Path) -> tuple[list[str], list[str], str]:
    """Router args, worker args and the control-plane scheme for --tls-*/--api-keys-file and the worker key.

    On one machine one certificate serves all three processes: the public listeners, and
    mutual TLS between router and workers (so it must name the host they listen on).
    """
    router: list[str] = ["--worker-keys-file", str(worker_keys)]
    worker: list[str] = ["--worker-keys-file", str(worker_keys)]
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("error: --tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.tls_ca is None:
        raise SystemExit("error: --tls-cert needs --tls-ca, the CA that signed it (the workers check the router with it)")
    if args.tls_ca is not None and args.tls_cert is None:
        raise SystemExit("error: --tls-ca needs --tls-cert and --tls-key")
    if args.tls_cert is not None:
        tls = ["--tls-cert", str(args.tls_cert), "--tls-key", str(args.tls_key), "--tls-ca", str(args.tls_ca)]
        router += tls
        worker += tls
    if args.api_keys_file is not None:
        router += ["--api-keys-file", str(args.api_keys_file)]
    return router, worker, "grpcs" if args.tls_cert is not None else "grpc"


def _engine_args(args) -> list[str]:
    """The engine flags given to up, passed on to every worker."""
    given = [("--max-num-seqs", args.max_num_seqs), ("--max-num-batched-tokens", args.max_num_batched_tokens),
             ("--kv-cache-dtype", args.kv_cache_dtype), ("--quantization", args.quantization)]
    return [str(x) for flag, value in given if value is not None for x in (flag, value)]


def run_up(args) -> int:
    secrets_dir = tempfile.TemporaryDirectory(prefix="splitserve-up-")
    worker_keys = args.worker_keys_file or _worker_keys_file(Path(secrets_dir.name))
    router_security, worker_security, scheme = _security_args(args, worker_keys)
    model = args.model
    if model is None:
        model = demo_checkpoint()
        print(f"no --model given: using a RANDOM-WEIGHT demo checkpoint at {model} (its text is meaningless)", flush=True)
    from splitserve.models.arch import load_arch_config

    load_arch_config(model)  # a missing or unsupported checkpoint: one line now, not three processes' failures
    try:
        layout = plan_layout(args.mode, args.device, args.prefill_device, args.decode_device, args.prefill_memory_share,
                             args.gpu_memory_utilization)
    except ValueError as e:
        raise ServiceStartError(str(e)) from None
    procs: list[subprocess.Popen] = []
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        router, address, ready_line = _start(
            ["router", "--model", str(model), "--host", args.host, "--port", str(args.port), "--metrics-port", "0",
             "--prefill-threshold", str(args.prefill_threshold), "--http-port", str(args.http_port), *router_security],
            "router",
        )
        procs.append(router)
        endpoints = [_endpoints("router", address, ready_line)]
        common = ["--model", str(model), "--host", args.host, "--port", "0", "--metrics-port", "0", "--log-level", args.log_level,
                  "--control-plane", f"{scheme}://{address}", *worker_security, *_engine_args(args)]
        for worker in layout.workers:  # one after another: on one GPU each sizes its KV from what the last left
            role = worker.role
            proc, worker_address, worker_line = _start(
                [role, *common, "--device", worker.device, *worker.args, "--worker-id", f"{role}-{os.getpid()}"], role
            )
            procs.append(proc)
            endpoints.append(_endpoints(role, worker_address, worker_line))
        router_http = HTTP_URL.search(ready_line)
        http = f"; OpenAI-compatible HTTP API at {router_http.group(1)}" if router_http else ""
        print("endpoints:\n" + "\n".join(endpoints), flush=True)
        print(f"splitserve router listening on {address} (gRPC splitserve.v1.Generation{http}; {layout.description}). Ctrl-C stops it.", flush=True)
        while not stop.is_set() and all(p.poll() is None for p in procs):
            stop.wait(0.5)
        failed = [p for p in procs if p.poll() not in (None, 0)]
        return 1 if failed else 0
    finally:
        # Workers first, and the router only once they are gone: they deregister from its
        # embedded control plane and drain their requests through it.
        workers, router_procs = procs[1:], procs[:1]
        for group in (workers, router_procs):
            for proc in group:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in group:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        secrets_dir.cleanup()
