"""fastproxy.stats: counter bookkeeping and snapshots."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from fastproxy.connection import Connection
from fastproxy.stats import Stats

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


def _conn(up: int = 0, down: int = 0) -> Connection:
    # Stats reads only the byte counts of a connection.
    return cast(Connection, SimpleNamespace(bytes_up=up, bytes_down=down))


def test_fresh_snapshot_is_all_zero() -> None:
    snap = Stats().snapshot()
    assert set(snap) == KEYS
    assert all(v == 0 for v in snap.values())


def test_opened_connected_closed() -> None:
    s = Stats()
    a, b, c = _conn(10, 20), _conn(1, 2), _conn()
    s.opened()
    s.opened()
    s.opened()
    assert (s.accepted, s.active, s.max_active) == (3, 3, 3)
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
