"""fastproxy.proxy: the embeddable Proxy (start/run/stop/join, stats, several listeners)."""

from __future__ import annotations

import dataclasses
import os
import socket
import threading

import pytest

from fastproxy.connection import State
from fastproxy.listener import Listener
from fastproxy.proxy import Proxy
from fastproxy.source import StaticSource
from tests.conftest import EmulatorProcess
from tests.inproc_support import (
    WAIT_S,
    connect,
    echo,
    echo_dial_info,
    echo_source,
    on_loop,
    recv_eof,
    running_proxy,
    wait_idle,
    wait_until,
)

STATS_KEYS = {
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
    "pool_capacity",
    "pool_in_use",
}


def test_start_serves_on_a_background_thread_and_stop_joins(
    emulator_echo: EmulatorProcess,
) -> None:
    listener = Listener.tcp("127.0.0.1", 0, echo_source(emulator_echo))
    proxy = Proxy([listener])
    thread = proxy.start()
    try:
        assert thread.is_alive() and thread is not threading.current_thread()
        assert proxy.ready.is_set() and proxy.loop.is_running
        with connect(listener.port) as sock:
            echo(sock, b"from the background thread")
    finally:
        proxy.stop()
        proxy.join(timeout=WAIT_S)
    assert not thread.is_alive()
    assert proxy.loop.is_closed
    assert listener.sock.fileno() == -1, "stop closes the listeners"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", listener.port), timeout=5).close()
    proxy.stop()  # stopping a stopped proxy is harmless


def test_run_returns_after_stop_from_another_thread(emulator_echo: EmulatorProcess) -> None:
    proxy = Proxy([Listener.tcp("127.0.0.1", 0, echo_source(emulator_echo))])
    returned = threading.Event()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            proxy.run()
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)
        returned.set()

    t = threading.Thread(target=serve)
    t.start()
    assert proxy.ready.wait(WAIT_S)
    with connect(proxy.listeners[0].port) as sock:
        echo(sock, b"run() in a thread of ours")
    assert not returned.is_set()
    proxy.stop()
    assert returned.wait(WAIT_S), "run() did not return after stop()"
    t.join(WAIT_S)
    assert not errors, errors


def test_stop_before_run_makes_run_return_at_once(emulator_echo: EmulatorProcess) -> None:
    proxy = Proxy([Listener.tcp("127.0.0.1", 0, echo_source(emulator_echo))])
    proxy.stop()
    t = threading.Thread(target=proxy.run)
    t.start()
    t.join(WAIT_S)
    assert not t.is_alive()
    assert proxy.loop.is_closed


def test_stats_keys_and_counters(emulator_echo: EmulatorProcess) -> None:
    listener = Listener.tcp("127.0.0.1", 0, echo_source(emulator_echo))
    with running_proxy([listener]) as proxy:
        snap = proxy.stats()
        assert set(snap) == STATS_KEYS
        assert all(isinstance(v, int) for v in snap.values())
        assert snap["accepted"] == snap["active"] == snap["bytes_up"] == 0
        assert snap["pool_in_use"] == 0 and snap["pool_capacity"] > 0

        payload = os.urandom(200_000)
        a, b = connect(listener.port), connect(listener.port)
        echo(a, payload)
        echo(b, b"x")
        snap = proxy.stats()
        assert snap["accepted"] == 2 and snap["active"] == 2 and snap["max_active"] == 2
        assert snap["connected_total"] == 2
        a.close()
        b.close()
        wait_idle(proxy)
        snap = proxy.stats()
        assert snap["active"] == 0 and snap["max_active"] == 2
        assert snap["closed_ok"] == 2 and snap["closed_error"] == 0
        # Bytes are added to the totals when a connection closes.
        assert snap["bytes_up"] == len(payload) + 1
        assert snap["bytes_down"] == len(payload) + 1
        assert snap["pool_in_use"] == 0


def test_stop_closes_in_flight_connections(emulator_echo: EmulatorProcess) -> None:
    listener = Listener.tcp("127.0.0.1", 0, echo_source(emulator_echo))
    proxy = Proxy([listener])
    proxy.start()
    socks = [connect(listener.port) for _ in range(3)]
    try:
        for s in socks:
            echo(s, b"in flight")
        conns = on_loop(proxy, lambda: list(proxy.connections))
        assert [c.state for c in conns] == [State.SPLICING] * 3
        proxy.stop()
        proxy.join(WAIT_S)
        for s in socks:
            assert recv_eof(s) == b""
        assert all(c.state is State.CLOSED for c in conns)
        assert all(c.up is not None and c.up.fileno() == -1 for c in conns)
        assert proxy.stats()["active"] == 0
        assert proxy.stats()["closed_ok"] == 3
    finally:
        proxy.stop()
        proxy.join(WAIT_S)
        for s in socks:
            s.close()


def test_two_listeners_on_one_proxy_use_their_own_sources(emulator_echo: EmulatorProcess) -> None:
    info = echo_dial_info(emulator_echo)
    first = StaticSource(dataclasses.replace(info, instance="first"))
    second = StaticSource(dataclasses.replace(info, instance="second"))
    la = Listener.tcp("127.0.0.1", 0, first)
    lb = Listener.tcp("127.0.0.1", 0, second)
    assert la.port != lb.port
    with running_proxy([la, lb]) as proxy:
        with connect(la.port) as a, connect(lb.port) as b:
            echo(a, b"to the first")
            echo(b, b"to the second")
            names = sorted(on_loop(proxy, lambda: [c.source.name for c in proxy.connections]))
            assert names == ["first", "second"]
        wait_until(lambda: proxy.stats()["active"] == 0, "both sessions to close")
        assert proxy.stats()["accepted"] == 2


def test_heap_is_trimmed_after_a_burst_of_sessions(
    emulator_echo: EmulatorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """malloc_trim runs at a heartbeat once enough sessions finished their handshake or closed
    since the last trim, and only when accepting has quietened down."""
    import fastproxy.proxy as proxy_module

    trims: list[int] = []

    def fake_trim(pad: int) -> int:
        trims.append(pad)
        return 1

    monkeypatch.setattr(proxy_module, "_malloc_trim", fake_trim)
    monkeypatch.setattr(proxy_module, "TRIM_AFTER_SESSIONS", 6)
    monkeypatch.setattr(proxy_module, "TRIM_QUIET_ACCEPTS", 2)
    monkeypatch.setattr(proxy_module, "HEARTBEAT_INTERVAL", 3600.0)  # only the calls below tick
    listener = Listener.tcp("127.0.0.1", 0, echo_source(emulator_echo))
    with running_proxy([listener]) as proxy:
        socks = [connect(listener.port) for _ in range(4)]
        for s in socks:
            echo(s, b"x")
        on_loop(proxy, proxy._tick)
        assert trims == []  # 4 handshakes < 6, and 4 accepts since the last heartbeat
        on_loop(proxy, proxy._tick)
        assert trims == []  # quiet now, but still 4 < 6
        socks.pop().close()
        socks.pop().close()
        wait_until(lambda: on_loop(proxy, lambda: len(proxy.connections)) == 2, "two closes")
        on_loop(proxy, proxy._tick)
        assert trims == [0]  # 4 handshakes + 2 closes, no accept since the last heartbeat
        for s in socks:
            s.close()
        wait_idle(proxy)
        on_loop(proxy, proxy._tick)
        assert trims == [0]  # 2 more closes since the trim: < 6
        more = [connect(listener.port) for _ in range(3)]
        for s in more:
            echo(s, b"y")
        for s in more:
            s.close()
        wait_idle(proxy)
        on_loop(proxy, proxy._tick)
        assert trims == [0]  # 2 + 3 + 3 = 8 >= 6, but 3 accepts >= 2 in this interval
        on_loop(proxy, proxy._tick)
        assert trims == [0, 0]
