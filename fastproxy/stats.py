"""Counters kept as plain ints on the loop thread; other threads read snapshots.

A snapshot is a dict built on the loop thread (through ``call_soon_threadsafe``) or, for a rough
read, directly: reading an int attribute is atomic under the GIL, so a monitoring thread may see
counters from slightly different instants but never a torn value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastproxy.connection import Connection


class Stats:
    __slots__ = (
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
    )

    def __init__(self) -> None:
        self.accepted = 0
        self.active = 0
        self.max_active = 0
        self.connected_total = 0  # sessions that reached SPLICING
        self.closed_ok = 0
        self.closed_error = 0
        self.dial_failures = 0  # connect, DNS, TLS or timeout failures before SPLICING
        self.bytes_up = 0
        self.bytes_down = 0
        self.emfile_events = 0  # times a listener paused for lack of descriptors
        self.accept_paused = 0  # times a listener paused, for descriptors or the gate

    def opened(self) -> None:
        self.accepted += 1
        self.active += 1
        if self.active > self.max_active:
            self.max_active = self.active

    def connected(self, conn: Connection) -> None:
        self.connected_total += 1

    def closed(self, conn: Connection, error: bool) -> None:
        self.active -= 1
        self.bytes_up += conn.bytes_up
        self.bytes_down += conn.bytes_down
        if error:
            self.closed_error += 1
        else:
            self.closed_ok += 1

    def snapshot(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}
