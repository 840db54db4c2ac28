"""NIXL's UCX progress thread without the busy spin.

The ``nixl`` Python API builds every agent with a progress-thread poll delay of 0: the
thread's ``poll()`` on the UCX workers' event descriptors returns at once, and it spins a
whole core per agent (one per worker, one per TP rank), even with no peer. With a delay the
thread sleeps in ``poll()`` until UCX signals an event, waking at least once per delay (NIXL
rounds it up to whole milliseconds) for what signals no descriptor. The delay is set where
the API hands its config to the bindings, since the API offers no setting for it.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

# poll() timeout of the progress thread; NIXL's minimum is 1 ms. SPLITSERVE_NIXL_PROGRESS_DELAY_US
# overrides it (0: NIXL's own busy spin).
PROGRESS_DELAY_US = 1000

_lock = threading.Lock()


@contextlib.contextmanager
def progress_thread_delay(delay_us: int | None = None) -> Iterator[None]:
    """Agents created inside get a progress thread that sleeps in poll() for up to ``delay_us``."""
    import nixl._api as api

    if delay_us is None:
        delay_us = int(os.environ.get("SPLITSERVE_NIXL_PROGRESS_DELAY_US", PROGRESS_DELAY_US))

    bindings = api.nixlBind

    class _Bindings:
        """The bindings module, except that an agent gets the delay in its config."""

        def __getattr__(self, name: str):
            return getattr(bindings, name)

        @staticmethod
        def nixlAgent(name, config):  # noqa: N802 - the bindings' name
            config.pthrDelay = delay_us
            return bindings.nixlAgent(name, config)

    with _lock:
        api.nixlBind = _Bindings()
        try:
            yield
        finally:
            api.nixlBind = bindings
