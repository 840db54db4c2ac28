"""The simulated router's view of load: stale between refreshes, raised by its own in-flight work."""
from __future__ import annotations

from splitserve.controlplane.types import WorkerLoad
from splitserve.sim.router_view import RouterView, ViewTiming


def test_published_load_is_seen_only_after_a_refresh():
    view = RouterView(["w"], ViewTiming())
    view.publish("w", WorkerLoad(1, 2, 30, 90, 100))
    assert view.load("w") == WorkerLoad()
    view.refresh()
    assert view.load("w") == WorkerLoad(1, 2, 30, 90, 100)


def test_in_flight_work_raises_the_stale_load_and_is_counted_once():
    view = RouterView(["w"], ViewTiming())
    view.publish("w", WorkerLoad(0, 1, 100, 90, 100))
    view.refresh()
    view.track("w", num_tokens=500, num_blocks=40)
    view.track("w", num_tokens=20, num_blocks=2)
    # Two requests routed, one running reported: one more waiting; tokens and blocks: the larger count.
    assert view.load("w") == WorkerLoad(1, 1, 520, 58, 100)
    view.track("w", num_tokens=500, num_blocks=40, sign=-1)
    view.track("w", num_tokens=20, num_blocks=2, sign=-1)
    assert view.load("w") == WorkerLoad(0, 1, 100, 90, 100)
