"""Progress bars for the slow steps (writing a random checkpoint, loading weights) on a terminal,
and nothing of them where the output is a log (a pipe)."""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path


def on_a_terminal(*argv: str) -> tuple[int, str]:
    """Runs ``argv`` with stdout and stderr on a pseudo-terminal; returns (exit status, what it wrote)."""
    master, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen(list(argv), stdin=child, stdout=child, stderr=child)
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=300), out.decode(errors="replace")


def test_model_init_shows_progress_on_a_terminal_only(tmp_path):
    code, out = on_a_terminal(sys.executable, "-m", "splitserve.cli", "model", "init", str(tmp_path / "a"))
    assert code == 0 and "writing weights" in out and "%|" in out, out
    piped = subprocess.run([sys.executable, "-m", "splitserve.cli", "model", "init", str(tmp_path / "b")],
                           capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and "writing weights" not in piped.stderr + piped.stdout


def test_weight_loading_shows_progress_on_a_terminal_only(llama_tiny_dir: Path):
    load = f"from splitserve.models.loader import load_model; load_model({str(llama_tiny_dir)!r})"
    code, out = on_a_terminal(sys.executable, "-c", load)
    assert code == 0 and f"loading {llama_tiny_dir.name}" in out and "tensor" in out, out
    piped = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and "loading" not in piped.stderr, piped.stderr
