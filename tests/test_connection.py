"""fastproxy.connection: the state table, and whole sessions through an in-process proxy against
the echo emulator (fault knobs are always undone in ``finally``: the emulator is session-wide)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from fastproxy.buffers import BufferPool
from fastproxy.connection import ALLOWED, Connection, IllegalTransition, Shared, State
from fastproxy.listener import Listener
from fastproxy.loop import Loop
from fastproxy.proxy import Proxy
from fastproxy.source import DialInfo, StaticSource
from fastproxy.stats import Stats
from tests.conftest import EmulatorProcess
from tests.e2e_support import DEMO_URI
from tests.inproc_support import (
    WAIT_S,
    connect,
    dead_address,
    echo,
    echo_dial_info,
    echo_source,
    echo_static_data,
    on_loop,
    recv_eof,
    recv_exactly,
    rst_close,
    running_proxy,
    self_signed_ca_pem,
    wait_idle,
    wait_until,
)

LOGGER = "fastproxy.connection"

# --- the state table ------------------------------------------------------------------------------

_PAIRS = list(itertools.product(State, State))


@pytest.fixture
def bare_connection() -> Iterator[Connection]:
    """A Connection that is never started: only its state machine is exercised."""
    loop = Loop()
    a, b = socket.socketpair()
    shared = Shared(loop, BufferPool(slab_size=4096, slab_count=2), Stats())
    src = StaticSource.__new__(StaticSource)  # never consulted: the connection is not started
    src.name = "test"
    conn = Connection(shared, a, "peer", src)
    try:
        yield conn
    finally:
        a.close()
        b.close()
        loop.close()


def test_table_covers_every_state_and_closed_is_terminal() -> None:
    assert set(ALLOWED) == set(State)
    assert ALLOWED[State.CLOSED] == frozenset()
    for src, targets in ALLOWED.items():
        assert src not in targets, f"{src} may not loop onto itself"
        if src is not State.CLOSED:
            assert State.CLOSED in targets, f"{src} must be able to close"


@pytest.mark.parametrize(("src", "dst"), _PAIRS, ids=[f"{a.value}-{b.value}" for a, b in _PAIRS])
def test_transition(bare_connection: Connection, src: State, dst: State) -> None:
    conn = bare_connection
    conn.state = src
    if dst in ALLOWED[src]:
        conn._to(dst)
        assert conn.state is dst
    else:
        with pytest.raises(IllegalTransition, match=f"{src.value} -> {dst.value}"):
            conn._to(dst)
        assert conn.state is src  # a refused edge changes nothing


def test_forbidden_edges_are_exactly_the_complement() -> None:
    forbidden = {(a, b) for a, b in _PAIRS if b not in ALLOWED[a]}
    allowed = {(a, b) for a, b in _PAIRS if b in ALLOWED[a]}
    assert len(forbidden) + len(allowed) == len(State) ** 2
    # The module's diagram: the forward path, HANDSHAKE -> SPLICING when the metadata exchange is
    # off, and a way to CLOSED from every other state.
    assert allowed == {
        (State.PENDING, State.CONNECTING),
        (State.CONNECTING, State.HANDSHAKE),
        (State.HANDSHAKE, State.EXCHANGE),
        (State.HANDSHAKE, State.SPLICING),
        (State.EXCHANGE, State.SPLICING),
        (State.SPLICING, State.DRAINING),
        *((s, State.CLOSED) for s in State if s is not State.CLOSED),
    }


# --- whole sessions -------------------------------------------------------------------------------


@pytest.fixture
def proxy(emulator_echo: EmulatorProcess) -> Iterator[Proxy]:
    with running_proxy([Listener.tcp("127.0.0.1", 0, echo_source(emulator_echo))]) as proxy:
        yield proxy


def _port(proxy: Proxy) -> int:
    return proxy.listeners[0].port


def _states(proxy: Proxy) -> list[State]:
    return on_loop(proxy, lambda: [c.state for c in proxy.connections])


def _connections(proxy: Proxy) -> list[Connection]:
    return on_loop(proxy, lambda: list(proxy.connections))


def _fault(emu: EmulatorProcess, name: str, body: dict[str, Any]) -> None:
    requests.post(
        f"{emu.admin_endpoint}/_emulator/{name}", json=body, timeout=30
    ).raise_for_status()


def test_session_reaches_splicing_and_returns_the_pool(proxy: Proxy) -> None:
    assert on_loop(proxy, lambda: proxy.pool.in_use) == 0
    with connect(_port(proxy)) as sock:
        echo(sock, b"hello through the proxy")
        assert _states(proxy) == [State.SPLICING]
        # Larger than one slab each way, so slabs really are borrowed and returned.
        echo(sock, os.urandom(300_000))
    wait_idle(proxy)
    snap = proxy.stats()
    assert snap["active"] == 0 and snap["connected_total"] == 1 and snap["closed_ok"] == 1


def test_client_half_close_drains_then_closes(proxy: Proxy) -> None:
    with connect(_port(proxy)) as sock:
        payload = os.urandom(100_000)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert recv_eof(sock) == payload
    wait_idle(proxy)
    assert proxy.stats()["closed_error"] == 0


@pytest.mark.parametrize("size", [1 << 20, 3 << 20])
def test_records_left_in_openssl_at_high_water_are_delivered(
    emulator_echo: EmulatorProcess, size: int
) -> None:
    """A burst larger than the high-water mark, then silence: decrypting stops at the mark with
    records still in the read BIO, and a client fast enough to take the whole queue in one flush
    leaves no writability event to resume on. Every byte must still arrive (this stalled until
    the reader's timeout: the end of the stream stayed inside OpenSSL)."""
    listener = Listener.tcp("127.0.0.1", 0, echo_source(emulator_echo))
    with running_proxy([listener], high_water=16 * 1024, low_water=4 * 1024) as proxy:
        with connect(listener.port) as sock:
            payload = os.urandom(size)
            writer = threading.Thread(target=sock.sendall, args=(payload,))
            writer.start()
            try:
                assert recv_exactly(sock, size) == payload
            finally:
                writer.join(WAIT_S)
        wait_idle(proxy)
        assert proxy.stats()["closed_error"] == 0


@pytest.mark.parametrize("how", ["rst", "fin"])
def test_client_disconnect_mid_stream_closes_upstream(proxy: Proxy, how: str) -> None:
    sock = connect(_port(proxy))
    echo(sock, b"warm-up")
    (conn,) = _connections(proxy)
    up = conn.up
    assert up is not None and up.fileno() >= 0
    # Data in flight both ways, none of it read back by the client.
    sock.sendall(os.urandom(64 * 1024))
    if how == "rst":
        rst_close(sock)
    else:
        sock.shutdown(socket.SHUT_WR)
        sock.close()
    wait_until(lambda: proxy.stats()["active"] == 0, "active to return to 0")
    wait_idle(proxy)
    assert conn.state is State.CLOSED
    assert up.fileno() == -1, "the upstream socket must be closed with the client"


def test_exchange_refused_closes_client_and_logs_server_message(
    emulator_echo: EmulatorProcess, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    _fault(emulator_echo, "mdx", {"refuse": True, "message": "nope"})
    try:
        with connect(_port(proxy)) as sock:
            sock.sendall(b"never forwarded")
            assert recv_eof(sock) == b""
    finally:
        _fault(emulator_echo, "mdx", {"refuse": False})
    wait_idle(proxy)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("nope" in line for line in lines), lines
    snap = proxy.stats()
    assert snap["connected_total"] == 0 and snap["closed_error"] == 1
    assert snap["dial_failures"] == 0  # the server answered: not a dial failure


def test_upstream_dropped_after_handshake_closes_client(
    emulator_echo: EmulatorProcess, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    _fault(emulator_echo, "drop-after-handshake", {"enabled": True})
    try:
        with connect(_port(proxy)) as sock:
            assert recv_eof(sock) == b""
    finally:
        _fault(emulator_echo, "drop-after-handshake", {"enabled": False})
    wait_idle(proxy)
    assert proxy.stats()["closed_error"] == 1
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("during the metadata exchange" in m for m in messages), messages
    # The fault is undone: the next session works.
    with connect(_port(proxy)) as sock:
        echo(sock, b"back to normal")


def test_wrong_ca_fails_tls_and_forwards_nothing(
    emulator_echo: EmulatorProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    data = echo_static_data(emulator_echo)
    data[DEMO_URI]["caCert"] = self_signed_ca_pem()
    listener = Listener.tcp("127.0.0.1", 0, echo_source(emulator_echo, data))
    with running_proxy([listener]) as proxy:
        with connect(listener.port) as sock:
            sock.sendall(b"secret that must not be echoed")
            assert recv_eof(sock) == b""
        wait_idle(proxy)
        snap = proxy.stats()
    assert snap["connected_total"] == 0 and snap["bytes_down"] == 0
    assert snap["dial_failures"] == 1
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("TLS handshake" in m and "certificate verify failed" in m for m in messages), (
        messages
    )


def test_dial_to_closed_port_logs_and_closes_client(
    emulator_echo: EmulatorProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    data = echo_static_data(emulator_echo)
    ip = dead_address()
    data[DEMO_URI]["ipAddress"] = ip
    listener = Listener.tcp("127.0.0.1", 0, echo_source(emulator_echo, data))
    with running_proxy([listener]) as proxy:
        with connect(listener.port) as sock:
            assert recv_eof(sock) == b""
        wait_idle(proxy)
        assert proxy.stats()["dial_failures"] == 1
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any(f"failed to dial {ip}:5433" in m for m in messages), messages


# --- waiting for connection info, deadlines, name resolution -------------------------------------


class _LateSource:
    """A source with nothing published until the test publishes info or an error."""

    def __init__(self, name: str = "late") -> None:
        self.name = name
        self.info: DialInfo | None = None
        self.err: Exception | None = None
        self.waiters: list[Callable[[], None]] = []
        self.proxy: Proxy | None = None

    def current(self) -> DialInfo | None:
        return self.info

    def error(self) -> Exception | None:
        return self.err

    def when_ready(self, callback: Callable[[], None]) -> None:
        self.waiters.append(callback)

    def dial_failed(self, reason: str) -> None:
        pass

    def publish(self, info: DialInfo | None = None, err: Exception | None = None) -> None:
        """From the test thread: set the new value and call the waiters on the loop thread."""
        assert self.proxy is not None

        def on_loop_thread() -> None:
            self.info, self.err = info, err
            waiters, self.waiters = self.waiters, []
            for cb in waiters:
                cb()

        self.proxy.loop.call_soon_threadsafe(on_loop_thread)


def test_pending_until_info_is_published(emulator_echo: EmulatorProcess) -> None:
    src = _LateSource()
    listener = Listener.tcp("127.0.0.1", 0, src)
    with running_proxy([listener]) as proxy:
        src.proxy = proxy
        with connect(listener.port) as sock:
            sock.sendall(b"queued while pending")
            wait_until(lambda: _states(proxy) == [State.PENDING], "the connection to be pending")
            assert on_loop(proxy, lambda: len(src.waiters)) == 1
            src.publish(echo_dial_info(emulator_echo))
            assert recv_exactly(sock, 20) == b"queued while pending"
            assert _states(proxy) == [State.SPLICING]
        wait_idle(proxy)


def test_pending_then_source_error_closes_client(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    src = _LateSource("broken-instance")
    listener = Listener.tcp("127.0.0.1", 0, src)
    with running_proxy([listener]) as proxy:
        src.proxy = proxy
        with connect(listener.port) as sock:
            wait_until(lambda: _states(proxy) == [State.PENDING], "the connection to be pending")
            src.publish(err=RuntimeError("admin API said 403"))
            assert recv_eof(sock) == b""
        wait_idle(proxy)
        # A new client after the error is refused at once, without waiting.
        with connect(listener.port) as sock:
            assert recv_eof(sock) == b""
        wait_idle(proxy)
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("no connection info for broken-instance: admin API said 403" in m for m in messages)


def test_dial_deadline_while_pending(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    src = _LateSource("slow-instance")
    listener = Listener.tcp("127.0.0.1", 0, src)
    with running_proxy([listener], dial_timeout=0.2) as proxy:
        with connect(listener.port) as sock:
            assert recv_eof(sock) == b""
        wait_idle(proxy)
        assert proxy.stats()["dial_failures"] == 0  # nothing was dialled
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("timed out waiting for connection info (slow-instance)" in m for m in messages)


def test_dns_name_is_resolved_off_the_loop(
    emulator_echo: EmulatorProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with socket.socket() as probe:  # a port on 127.0.0.1 with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    info = dataclasses.replace(echo_dial_info(emulator_echo), address="localhost", port=port)
    listener = Listener.tcp("127.0.0.1", 0, StaticSource(info))
    with running_proxy([listener]) as proxy:
        with connect(listener.port) as sock:
            assert recv_eof(sock) == b""
        wait_idle(proxy)
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("failed to dial" in m and f":{port}: ECONNREFUSED" in m for m in messages), messages
