"""fastproxy.stats: counter bookkeeping, histograms and snapshots."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any, cast

import pytest

from fastproxy.connection import Connection
from fastproxy.stats import (
    DIAL_BUCKETS,
    LOOP_BUCKETS,
    Histogram,
    InstanceCounters,
    Stats,
    instance_snapshots,
)

KEYS = {
    "accept_paused",
    "accepted",
    "active",
    "bytes_down",
    "bytes_up",
    "closed_error",
    "closed_ok",
    "connected_total",
    "dial_failures",
    "emfile_events",
    "max_active",
}


def _conn(counters: InstanceCounters, up: int = 0, down: int = 0) -> Connection:
    # Stats reads only the byte counts and the per-instance counters of a connection.
    return cast(Connection, SimpleNamespace(bytes_up=up, bytes_down=down, counters=counters))


def test_fresh_snapshot_is_all_zero() -> None:
    snap = Stats().snapshot()
    assert set(snap) == KEYS
    assert all(v == 0 for v in snap.values())


def test_opened_connected_closed() -> None:
    s = Stats()
    inst = s.instance("p.r.c.i")
    a, b, c = _conn(inst, 10, 20), _conn(inst, 1, 2), _conn(inst)
    s.opened(inst)
    s.opened(inst)
    s.opened()
    assert (s.accepted, s.active, s.max_active) == (3, 3, 3)
    assert inst.accepted == 2
    s.connected(a)
    s.connected(b)
    assert s.connected_total == 2
    s.closed(a, error=False)
    s.closed(c, error=True)
    assert (s.active, s.max_active, s.closed_ok, s.closed_error) == (1, 3, 1, 1)
    assert (s.bytes_up, s.bytes_down) == (10, 20)
    s.opened()
    assert (s.accepted, s.active, s.max_active) == (4, 2, 3)  # the high mark stays
    s.closed(b, error=False)
    assert (s.bytes_up, s.bytes_down) == (11, 22)
    assert (inst.bytes_up, inst.bytes_down) == (11, 22)


def test_snapshot_is_a_copy() -> None:
    s = Stats()
    s.opened()
    snap: dict[str, Any] = s.snapshot()
    s.opened()
    assert snap["accepted"] == 1 and s.snapshot()["accepted"] == 2
    snap["accepted"] = 99
    assert s.accepted == 2


def test_every_counter_is_in_the_snapshot() -> None:
    s = Stats()
    for i, name in enumerate(sorted(KEYS)):
        setattr(s, name, i + 1)
    snap = s.snapshot()
    assert snap == {name: i + 1 for i, name in enumerate(sorted(KEYS))}


def test_instance_counters_are_created_once_per_name() -> None:
    s = Stats()
    a = s.instance("a")
    assert s.instance("a") is a
    assert s.instance("b") is not a
    assert set(s.instances) == {"a", "b"}


def test_failures_by_reason_and_dial_failures() -> None:
    s = Stats()
    inst = s.instance("a")
    s.failed(inst, "connect", dial=True)
    s.failed(inst, "connect", dial=True)
    s.failed(inst, "exchange", dial=False)
    s.failed(inst, "no_connection_info", dial=False)
    assert inst.failed == {"connect": 2, "exchange": 1, "no_connection_info": 1}
    assert s.dial_failures == 2  # its meaning predates the per-reason counters


def test_refused_splits_accept_pauses_by_reason() -> None:
    s = Stats()
    assert s.refused() == {"max_connections": 0, "out_of_fds": 0}
    s.accept_paused = 5  # as the listener counts: every pause here ...
    s.emfile_events = 2  # ... and the descriptor ones here too
    assert s.refused() == {"max_connections": 3, "out_of_fds": 2}


def test_histogram_buckets_are_inclusive_upper_bounds() -> None:
    h = Histogram((1.0, 2.0, 5.0))
    for v in (0.0, 1.0, 1.5, 2.0, 4.9, 5.0, 5.1, 100.0):
        h.observe(v)
    snap = h.snapshot()
    assert snap.bounds == (1.0, 2.0, 5.0)
    assert snap.counts == (2, 2, 2, 2)  # <=1, (1,2], (2,5], +Inf
    assert snap.cumulative() == [2, 4, 6, 8]
    assert snap.observations == 8
    assert snap.total == pytest.approx(119.5)


def test_histogram_snapshot_is_a_copy() -> None:
    h = Histogram(DIAL_BUCKETS)
    h.observe(0.01)
    snap = h.snapshot()
    h.observe(0.01)
    assert snap.observations == 1 and h.snapshot().observations == 2


def test_histogram_rejects_unsorted_bounds() -> None:
    with pytest.raises(ValueError):
        Histogram((2.0, 1.0))
    with pytest.raises(ValueError):
        Histogram((1.0, 1.0))
    assert Histogram(LOOP_BUCKETS).counts == [0] * (len(LOOP_BUCKETS) + 1)


def test_instance_snapshots_add_live_bytes_after_reading_totals() -> None:
    s = Stats()
    inst = s.instance("a")
    s.instance("b")
    inst.bytes_up, inst.bytes_down = 100, 200
    inst.accepted = 3
    inst.failed["tls"] = 1
    inst.dial_latency.observe(0.02)
    order: list[str] = []

    def live() -> dict[str, tuple[int, int]]:
        order.append("live")
        # A connection closing now is added to the totals after they were read: not counted twice.
        inst.bytes_up += 5
        return {"a": (5, 7)}

    snaps = instance_snapshots(s, live)
    assert order == ["live"]
    a, b = snaps["a"], snaps["b"]
    assert (a.accepted, a.bytes_up, a.bytes_down) == (3, 105, 207)
    assert dict(a.failed) == {"tls": 1}
    assert a.dial_latency.observations == 1 and a.tls_latency.observations == 0
    assert (b.accepted, b.bytes_up, b.bytes_down) == (0, 0, 0)
    inst.failed["tls"] = 9
    assert dict(a.failed) == {"tls": 1}, "a snapshot does not change afterwards"


def test_snapshots_from_another_thread_while_the_owner_counts() -> None:
    """The owner thread writes plain ints; a reader copies them concurrently without errors and
    sees monotonic values (ints and list copies are atomic under the GIL)."""
    s = Stats()
    inst = s.instance("a")
    stop = threading.Event()

    def owner() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            s.opened(s.instance(f"x{n % 50}"))
            inst.dial_latency.observe(0.001 * (n % 100))
            s.failed(inst, "connect" if n % 2 else "tls", dial=True)

    t = threading.Thread(target=owner)
    t.start()
    try:
        last = -1
        for _ in range(200):
            snaps = instance_snapshots(s)
            total = snaps["a"].dial_latency.observations
            assert total >= last
            last = total
    finally:
        stop.set()
        t.join()
