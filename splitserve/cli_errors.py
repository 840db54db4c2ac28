"""What the `splitserve` command treats as the user's mistake: flag values it checks while
parsing, and the errors from deeper down that the user can fix (a checkpoint that is not
there or not supported, a port in use, a control plane that does not answer, bad TLS files).
Each ends the command with one line on stderr and exit status 2; anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable

class UsageError(Exception):
    """Flags that do not go together, or what a flag names is missing."""


# (module, class): checked only when the module was imported, so the check itself imports nothing heavy.
USER_ERRORS = (
    ("splitserve.cli_errors", "UsageError"),
    ("splitserve.models.arch", "CheckpointError"),
    ("splitserve.config", "ConfigError"),
    ("splitserve.controlplane.types", "ControlPlaneUnavailable"),
    ("splitserve.services.security", "SecurityConfigError"),
    ("splitserve.services.grpc_server", "PortInUse"),
    ("splitserve.up", "ServiceStartError"),
)
# A listener that cannot bind: the message then names the address (services/router/openai/server.py).
BIND_ERRNOS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def user_error_message(error: BaseException) -> str | None:
    """The one line to print for a mistake the user can fix; None for anything else."""
    for module_name, class_name in USER_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(error, getattr(module, class_name, ())):
            return str(error)
    if isinstance(error, SystemExit) and isinstance(error.code, str) and error.code.startswith("error: "):
        return error.code.removeprefix("error: ")  # raise SystemExit("error: ...") in a command's own checks
    if isinstance(error, FileExistsError):
        return str(error)
    if isinstance(error, OSError) and error.errno in BIND_ERRNOS and error.filename is not None:
        return f"cannot listen on {error.filename}: {error.strerror}"
    return None


def _number(kind: type, check: Callable[[float], bool], wanted: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text} is not {wanted}")
        return value

    parse.__name__ = wanted  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a positive number")
non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")
fraction = _number(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
port_number = _number(int, lambda v: 0 <= v <= 65535, "a port (0-65535; 0: any free port)")
port_or_off = _number(int, lambda v: -1 <= v <= 65535, "a port (0-65535; 0: any free port; -1: off)")
