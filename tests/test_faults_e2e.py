"""The fault matrix (issue 7), over real sockets on loopback.

* Upstream faults come from a fake AlloyDB instance built on the emulator's own PKI
  (``tests/fault_support.py``): resets in the TLS handshake, in the metadata exchange and in the
  middle of the stream, servers that never answer, garbage and oversized exchange answers, a
  TLS 1.2-only server, a certificate for another address. The same proxy meanwhile serves a real
  PostgreSQL session through the emulator, which must not notice.
* Client faults: clients that vanish (RST or FIN) before the proxy is splicing, clients that never
  send.
* Admin API faults against the emulator's Admin API (its ``/_emulator/`` fault endpoints, plus an
  interposer for the two answers the emulator never gives: a certificate for another key and an
  already expired one), with the refresher of protocol §5.3 in front of a real data plane.
* Max connections and ``/readiness``, SIGTERM and SIGINT under load with each delay flag, and a
  churn soak, on the real process (the soak: 15 s here, ten minutes with ``FASTPROXY_LONG=1``).

The long variants: ``FASTPROXY_LONG=1 HYPOTHESIS_PROFILE=fuzz .venv/bin/pytest -m "fuzz or long"``.

Pool occupancy is read with ``proxy.stats()["pool_in_use"]`` (and on the loop thread).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import google.oauth2.credentials
import pytest
import requests

from fastproxy.admin import AdminClient
from fastproxy.emulator.static_info import build_static_info
from fastproxy.instance_uri import InstanceURI
from fastproxy.listener import Listener
from fastproxy.loop import Loop
from fastproxy.proxy import Proxy
from fastproxy.refresh import Refresher, RefreshingSource
from fastproxy.source import DialInfo, StaticSource, static_dial_info
from tests.conftest import EmulatorProcess, echo_emulator
from tests.e2e_support import (
    DEMO_URI,
    login_without_password,
    query_message,
    read_message,
    recv_exactly,
)
from tests.fault_support import (
    FakeInstance,
    Peer,
    admin_interposer,
    client_key,
    server_context,
)
from tests.inproc_support import (
    WAIT_S,
    connect,
    echo,
    on_loop,
    recv_eof,
    rst_close,
    running_proxy,
    wait_idle,
    wait_until,
)

pytestmark = pytest.mark.e2e

LONG = os.environ.get("FASTPROXY_LONG") == "1"
long_only = [
    pytest.mark.long,
    pytest.mark.skipif(not LONG, reason="long variant: set FASTPROXY_LONG=1"),
]

CONN_LOG = "fastproxy.connection"
REFRESH_LOG = "fastproxy.refresh"
IAM_USER = "iam-sa@demo-project.iam"
#: "Promptly", on a loaded two-core machine: the real figure is milliseconds.
PROMPT_S = 5.0


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_info(emulator_pg: EmulatorProcess) -> DialInfo:
    """Dial info for the emulator with real PostgreSQL behind it (IAM login, no password)."""
    data = build_static_info(emulator_pg.admin_endpoint, "iam-token", [DEMO_URI])
    return static_dial_info(
        data, InstanceURI.parse(DEMO_URI), auto_iam_authn=True, exchange_token="iam-token"
    )


def pg_query(sock: socket.socket, sql: str) -> list[str]:
    """Run ``sql`` on a logged-in raw PostgreSQL connection; the first column of every row."""
    sock.sendall(query_message(sql))
    rows: list[str] = []
    while True:
        kind, body = read_message(sock)
        if kind == b"E":
            raise AssertionError(body.decode(errors="replace"))
        if kind == b"D":
            (length,) = struct.unpack(">i", body[2:6])
            rows.append(body[6 : 6 + length].decode())
        if kind == b"Z":
            return rows


def warnings_for(caplog: pytest.LogCaptureFixture, name: str, logger: str = CONN_LOG) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == logger and r.levelno >= logging.WARNING and f"[{name}]" in r.getMessage()
    ]


def connections(proxy: Proxy) -> int:
    return on_loop(proxy, lambda: len(proxy.connections))


def pool_in_use(proxy: Proxy) -> int:
    return int(proxy.stats()["pool_in_use"])


# --- upstream resets ----------------------------------------------------------------------------


def _resetting(where: str) -> Callable[[Peer], None]:
    def run(peer: Peer) -> None:
        if where == "handshake":
            assert peer.sock.recv(64)  # the start of the ClientHello, and no answer
            peer.reset()
            return
        peer.tls()
        peer.read_exchange_request()
        if where == "exchange":
            peer.reset()
            return
        peer.answer_ok()
        peer.sock.sendall(recv_exactly(peer.sock, 64 * 1024))  # echo the first 64 KiB
        peer.server.release.wait(WAIT_S)  # the client is streaming more: reset now
        peer.reset()

    return run


@pytest.mark.parametrize("where", ["handshake", "exchange", "stream"])
def test_upstream_reset_closes_the_client_promptly_with_one_line_and_spares_others(
    pg_info: DialInfo, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    caplog.set_level(logging.DEBUG, logger=CONN_LOG)
    with FakeInstance(_resetting(where)) as fake:
        faulty = Listener.tcp("127.0.0.1", 0, StaticSource(fake.dial_info()))
        healthy = Listener.tcp("127.0.0.1", 0, StaticSource(pg_info))
        with running_proxy([faulty, healthy]) as proxy:
            pg = connect(healthy.port)
            login_without_password(pg, IAM_USER)
            assert pg_query(pg, "SELECT 1") == ["1"]

            client = connect(faulty.port)
            received = b""
            streamer: threading.Thread | None = None
            if where == "stream":
                payload = os.urandom(64 * 1024)
                echo(client, payload)

                def keep_sending() -> None:
                    with contextlib.suppress(OSError):
                        for _ in range(64):
                            client.sendall(os.urandom(16 * 1024))

                streamer = threading.Thread(target=keep_sending, daemon=True)
                streamer.start()
            else:
                client.sendall(b"a StartupMessage that must go nowhere")
            t0 = time.monotonic()
            fake.release.set()
            received = recv_eof(client)
            elapsed = time.monotonic() - t0
            client.close()
            if streamer is not None:
                streamer.join(WAIT_S)
            fake.join()
            assert not fake.errors, fake.errors
            assert received == b"", "nothing after the reset may reach the client"
            assert elapsed < PROMPT_S, f"the client saw the close after {elapsed:.1f} s"

            wait_until(lambda: connections(proxy) == 1, "the faulty connection to be closed")
            # Other connections are unaffected: the PostgreSQL session goes on.
            assert pg_query(pg, "SELECT 40 + 2") == ["42"]
            assert on_loop(proxy, lambda: proxy.pool.in_use) == 0  # idle sessions hold no slab
            snap = proxy.stats()
            assert snap["closed_error"] == 1
            pg.close()
            wait_idle(proxy)
    lines = warnings_for(caplog, "fake.instance")
    assert len(lines) == 1, lines
    line = lines[0]
    assert "reset" in line.lower() or "ECONNRESET" in line, line
    if where == "handshake":
        assert "TLS" in line or "handshake" in line or "upstream" in line, line


# --- clients that vanish before the proxy is splicing -----------------------------------------


def _held_until_released(where: str) -> Callable[[Peer], None]:
    """Hold the proxy in the TLS handshake or the exchange until the test releases it, then
    answer as a real instance would and wait for the proxy to close the connection."""

    def run(peer: Peer) -> None:
        if where == "handshake":
            assert peer.server.release.wait(WAIT_S)
        peer.tls()
        peer.read_exchange_request()
        if where == "exchange":
            assert peer.server.release.wait(WAIT_S)
        peer.answer_ok()
        peer.wait_closed_by_proxy()

    return run


@pytest.mark.parametrize("how", ["rst", "fin"])
@pytest.mark.parametrize("where", ["handshake", "exchange"])
def test_client_gone_before_splicing_closes_the_upstream_and_returns_buffers(
    caplog: pytest.LogCaptureFixture, where: str, how: str
) -> None:
    caplog.set_level(logging.WARNING, logger=CONN_LOG)
    with FakeInstance(_held_until_released(where)) as fake:
        listener = Listener.tcp("127.0.0.1", 0, StaticSource(fake.dial_info()))
        with running_proxy([listener]) as proxy:
            client = connect(listener.port)
            client.sendall(b"StartupMessage sent before the answer")
            (peer,) = fake.wait_peers(1)
            state = "handshake" if where == "handshake" else "exchange"
            wait_until(
                lambda: (
                    on_loop(proxy, lambda: [c.state.value for c in proxy.connections]) == [state]
                ),
                f"the connection to be in the {state} state",
            )
            if how == "rst":
                rst_close(client)
            else:
                client.shutdown(socket.SHUT_WR)
                client.close()
            t0 = time.monotonic()
            fake.release.set()
            fake.join()
            assert not fake.errors, fake.errors
            assert peer.closed_at is not None
            assert peer.closed_at - t0 < PROMPT_S, "the upstream outlived its client"
            wait_until(lambda: pool_in_use(proxy) == 0, "every slab back in the pool")
            wait_idle(proxy)
            assert proxy.stats()["active"] == 0
    # A client that leaves is not the proxy's error.
    assert warnings_for(caplog, "fake.instance") == []


@pytest.mark.parametrize("stall", ["handshake", "exchange"])
def test_upstream_that_never_answers_meets_the_configured_deadline(
    caplog: pytest.LogCaptureFixture, stall: str
) -> None:
    """An upstream that never answers the handshake (or the exchange): the configured deadline
    fires for a waiting client and for one that has already gone; nothing is forwarded."""
    caplog.set_level(logging.WARNING, logger=CONN_LOG)
    deadline = 1.0

    def silent(peer: Peer) -> None:
        if stall == "exchange":
            peer.tls()
            peer.read_exchange_request()
        peer.wait_closed_by_proxy()

    with FakeInstance(silent) as fake:
        listener = Listener.tcp("127.0.0.1", 0, StaticSource(fake.dial_info()))
        kw = {"dial_timeout": deadline} if stall == "handshake" else {"exchange_timeout": deadline}
        with running_proxy([listener], **kw) as proxy:  # type: ignore[arg-type]
            t0 = time.monotonic()
            waiting = connect(listener.port)
            gone = connect(listener.port)
            waiting.sendall(b"never forwarded")
            fake.wait_peers(2)
            rst_close(gone)
            assert recv_eof(waiting) == b""
            waited = time.monotonic() - t0
            waiting.close()
            fake.join()
            assert not fake.errors, fake.errors
            for peer in fake.peers:
                assert peer.closed_at is not None
                assert peer.closed_at - t0 >= deadline * 0.9
                assert b"never forwarded" not in bytes(peer.received)
            assert deadline * 0.9 <= waited < deadline + PROMPT_S, waited
            wait_idle(proxy)
            snap = proxy.stats()
            assert snap["connected_total"] == 0 and snap["bytes_down"] == 0
    lines = warnings_for(caplog, "fake.instance")
    assert len(lines) == 2, lines
    want = (
        "timed out in the TLS handshake (127.0.0.1:"
        if stall == "handshake"
        else "timed out waiting for the metadata exchange response"
    )
    assert all(want in line for line in lines), lines


def test_deadlines_default_to_the_auth_proxys_30_seconds() -> None:
    """The numbers come from configuration, with the Auth Proxy's defaults (protocol §5.1: a
    30 s dial deadline per client, a 30 s metadata exchange I/O timeout)."""
    import inspect

    from fastproxy.__main__ import build_parser
    from fastproxy.connection import Shared
    from fastproxy.duration import parse_duration

    args = build_parser().parse_args([DEMO_URI])
    assert parse_duration(args.dial_timeout) == 30.0
    for fn in (Proxy.__init__, Shared.__init__):
        params = inspect.signature(fn).parameters
        assert params["dial_timeout"].default == 30.0
        assert params["exchange_timeout"].default == 30.0
    args = build_parser().parse_args([DEMO_URI, "--dial-timeout", "1m30s"])
    assert parse_duration(args.dial_timeout) == 90.0


# --- bad answers from the upstream ---------------------------------------------------------------

PG_AUTH_OK = b"R\x00\x00\x00\x08\x00\x00\x00\x00"  # what the client must never see


def _bad_answer(fault: str) -> Callable[[Peer], None]:
    def run(peer: Peer) -> None:
        try:
            peer.tls()
        except OSError:  # tls12: the proxy aborts the handshake
            peer.notes.append("handshake failed")
            return
        try:
            peer.read_exchange_request()
        except OSError:  # wrong-san: our side of TLS 1.3 is done, the proxy's check failed
            peer.notes.append("no exchange request")
            return
        if fault == "garbage":
            # A frame whose body is not a protobuf message, then "PostgreSQL" bytes.
            peer.sock.sendall(b"\x00\x00\x00\x04\xff\xff\xff\xff" + PG_AUTH_OK)
        elif fault == "oversized":
            peer.sock.sendall(struct.pack(">I", 1 << 20) + b"\x08\x01" * 4096 + PG_AUTH_OK)
        elif fault == "http":
            peer.sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        peer.wait_closed_by_proxy()

    return run


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("garbage", "metadata exchange"),
        ("oversized", "too large"),
        ("http", "metadata exchange"),
        ("tls12", "version"),
        ("wrong-san", "127.0.0.9"),
    ],
)
def test_bad_upstream_is_refused_with_a_clear_message_and_nothing_forwarded(
    caplog: pytest.LogCaptureFixture, fault: str, message: str
) -> None:
    caplog.set_level(logging.WARNING, logger=CONN_LOG)
    if fault == "tls12":
        ctx = server_context(tls12_only=True)
    elif fault == "wrong-san":
        ctx = server_context("127.0.0.9")  # a valid certificate from the right CA, for another IP
    else:
        ctx = server_context()
    with FakeInstance(_bad_answer(fault), context=ctx) as fake:
        listener = Listener.tcp("127.0.0.1", 0, StaticSource(fake.dial_info()))
        with running_proxy([listener]) as proxy:
            with connect(listener.port) as client:
                client.sendall(b"secret StartupMessage")
                assert recv_eof(client) == b"", "nothing may be forwarded to the client"
            fake.join()
            assert not fake.errors, fake.errors
            wait_idle(proxy)
            snap = proxy.stats()
    assert snap["connected_total"] == 0 and snap["bytes_down"] == 0 and snap["bytes_up"] == 0
    for peer in fake.peers:
        assert b"secret" not in bytes(peer.received), "the client's bytes reached a bad upstream"
    lines = warnings_for(caplog, "fake.instance")
    assert len(lines) == 1, lines
    assert message in lines[0], lines[0]
    if fault in ("tls12", "wrong-san"):
        assert snap["dial_failures"] == 1


# --- Admin API faults (protocol §5.3: keep the last good certificate; one clear line each) --------

API_TOKEN = "fault-api-token"
API_PRINCIPAL = "faults@example.com"
URI = InstanceURI.parse(DEMO_URI)
SHORT = URI.short


@pytest.fixture(scope="module")
def api_emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    yield from echo_emulator(tmp_path_factory.mktemp("faults-api"), f"{API_TOKEN}={API_PRINCIPAL}")


def emu_post(emu: EmulatorProcess, name: str, body: dict[str, Any] | None = None) -> None:
    requests.post(
        f"{emu.admin_endpoint}/_emulator/{name}", json=body or {}, timeout=30
    ).raise_for_status()


def emu_requests(emu: EmulatorProcess) -> list[dict[str, Any]]:
    r = requests.get(f"{emu.admin_endpoint}/_emulator/requests", timeout=30)
    r.raise_for_status()
    return list(r.json()["requests"])


@pytest.fixture
def emu(api_emu: EmulatorProcess) -> Iterator[EmulatorProcess]:
    """The module's emulator with no fault and an empty request log, before and after."""
    emu_post(api_emu, "reset")
    emu_post(api_emu, "requests/clear")
    yield api_emu
    emu_post(api_emu, "reset")
    emu_post(
        api_emu,
        "forbid",
        {"principal": API_PRINCIPAL, "cluster": URI.cluster_parent, "forbidden": False},
    )


class ApiProxy:
    """An in-process proxy whose certificates come from the Admin API through the refresher."""

    def __init__(self, proxy: Proxy, source: RefreshingSource, refresher: Refresher) -> None:
        self.proxy, self.source, self.refresher = proxy, source, refresher
        self.port = proxy.listeners[0].port
        #: added to the refresher's wall clock: a certificate can be made to look expired
        self.offset = 0.0

    def wall(self) -> float:
        return time.time() + self.offset

    def counts(self) -> tuple[int, int]:
        """(successful, failed) certificate refreshes so far."""
        snap = self.refresher.metrics_snapshot().get(SHORT)
        return (snap.successes, snap.failures) if snap is not None else (0, 0)

    def force(self) -> None:
        """What a failed dial does: ask for a refresh now (rate-limited)."""
        self.source.dial_failed("test")

    def generation(self) -> int:
        info = self.source.current()
        assert info is not None, f"no connection info: {self.source.error()}"
        return info.generation


@contextlib.contextmanager
def api_proxy(endpoint: str, *, rate: float = 1.0) -> Iterator[ApiProxy]:
    loop = Loop()
    creds = google.oauth2.credentials.Credentials(API_TOKEN)  # type: ignore[no-untyped-call]
    client = AdminClient(creds, endpoint=endpoint, max_retry_delay=2.0)
    box: list[ApiProxy] = []
    refresher = Refresher(
        loop, client, key_factory=client_key, rate=rate, wall=lambda: box[0].wall()
    )
    source = RefreshingSource(refresher, URI, "PRIVATE", token_source=lambda: (API_TOKEN, None))
    listener = Listener.tcp("127.0.0.1", 0, source)
    proxy = Proxy([listener], loop=loop)
    box.append(ApiProxy(proxy, source, refresher))
    refresher.start()
    thread = proxy.start()
    try:
        yield box[0]
    finally:
        proxy.stop()
        proxy.join(WAIT_S)
        refresher.stop()
        client.close()
        assert not thread.is_alive()


def echo_once(port: int, payload: bytes = b"ping through the proxy") -> None:
    with connect(port) as sock:
        echo(sock, payload)


def refused_with_nothing_forwarded(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(b"must not be forwarded")
        assert recv_eof(sock) == b""


def refresh_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == REFRESH_LOG and r.levelno >= logging.WARNING
    ]


def test_admin_api_503_burst_is_retried_with_backoff_and_waiting_clients_are_served(
    emu: EmulatorProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fastproxy")
    emu_post(emu, "fail", {"count": 2, "status": 503, "message": "try again later"})
    with api_proxy(emu.admin_endpoint) as ap:
        # A client that arrives during the burst waits (PENDING) and is then served.
        with connect(ap.port) as sock:
            echo(sock, b"queued while the Admin API said 503")
        assert ap.counts() == (1, 0)
    log = emu_requests(emu)
    statuses = [e["status"] for e in log]
    assert sorted(statuses) == [200, 200, 503, 503], statuses
    for i, entry in enumerate(log):
        if entry["status"] != 503:
            continue
        retry = next(e for e in log[i + 1 :] if e["path"] == entry["path"])
        gap = retry["t_start"] - entry["t_end"]
        assert gap >= 0.9, f"retried after {gap:.2f} s: no back-off"
    retries = [m for m in caplog.messages if "answered HTTP 503; retry" in m]
    assert len(retries) == 2, retries
    assert refresh_warnings(caplog) == []  # retried inside one refresh: nothing failed


def test_admin_api_500_is_not_retried_by_the_client_but_by_the_schedule(
    emu: EmulatorProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fastproxy")
    emu_post(emu, "fail", {"count": 1, "status": 500, "message": "internal boom"})
    with api_proxy(emu.admin_endpoint) as ap:
        wait_until(lambda: ap.counts() == (1, 1), "one failed then one good refresh")
        echo_once(ap.port)
    statuses = sorted(e["status"] for e in emu_requests(emu))
    assert statuses == [200, 200, 200, 500], statuses  # two fetches of two calls: no retry of 500
    lines = refresh_warnings(caplog)
    assert len(lines) == 1, lines
    assert f"refresh of {SHORT} failed" in lines[0] and "internal boom (HTTP 500)" in lines[0]


def test_admin_api_403_after_working_keeps_the_good_certificate_until_it_expires(
    emu: EmulatorProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fastproxy")
    forbid = {"principal": API_PRINCIPAL, "cluster": URI.cluster_parent}
    with api_proxy(emu.admin_endpoint) as ap:
        wait_until(lambda: ap.counts() == (1, 0), "the first certificate")
        good = ap.generation()
        held = connect(ap.port)
        echo(held, b"open before the 403")
        emu_post(emu, "forbid", {**forbid, "forbidden": True})
        ap.force()
        wait_until(lambda: ap.counts()[1] >= 1, "a refused refresh")
        # The certificate is still valid, so it is kept (protocol §5.3); the revocation reaches the
        # data plane too, where the server refuses the exchange with its own reason.
        assert ap.generation() == good
        refused_with_nothing_forwarded(ap.port)
        echo(held, b"still flowing")
        # Once it has expired (the refresher's clock moves past it), clients are refused with the
        # Admin API's reason and nothing is forwarded.
        ap.offset = 2 * 3600
        refused_with_nothing_forwarded(ap.port)
        echo(held, b"connections in flight keep their TLS session")
        # Permission back, clock back: service resumes without a restart.
        emu_post(emu, "forbid", {**forbid, "forbidden": False})
        ap.offset = 0.0
        ap.force()
        wait_until(lambda: ap.counts()[0] == 2, "a new certificate")
        assert ap.generation() > good
        echo_once(ap.port)
        held.close()
    lines = refresh_warnings(caplog)
    assert lines and all(
        f"refresh of {SHORT} failed: caller lacks permission to use instance {SHORT}" in m
        and "(HTTP 403)" in m
        for m in lines
    ), lines
    refused = warnings_for(caplog, SHORT)
    assert len(refused) == 2, refused
    assert "metadata exchange refused by server: faults@example.com lacks permission" in refused[0]
    assert f"no connection info for {SHORT}: caller lacks permission" in refused[1]


def test_admin_api_malformed_json_keeps_the_last_good_certificate(
    emu: EmulatorProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fastproxy")
    with api_proxy(emu.admin_endpoint) as ap:
        wait_until(lambda: ap.counts() == (1, 0), "the first certificate")
        good = ap.generation()
        emu_post(emu, "malformed", {"count": 2})
        ap.force()
        wait_until(lambda: ap.counts()[1] == 1, "the malformed answer to be refused")
        assert ap.generation() == good
        echo_once(ap.port)
        wait_until(lambda: ap.counts()[0] == 2, "the retry (the fault covered two calls)")
        assert ap.generation() > good
        echo_once(ap.port)
    lines = refresh_warnings(caplog)
    assert len(lines) == 1, lines
    assert f"malformed response from the Admin API for instance {SHORT}" in lines[0]
    assert "not valid JSON" in lines[0]


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("wrong-key", "the client certificate is for a different public key"),
        ("expired", "the client certificate has already expired"),
    ],
)
def test_admin_api_unusable_certificate_is_refused_with_one_clear_line(
    emu: EmulatorProcess, caplog: pytest.LogCaptureFixture, mode: str, reason: str
) -> None:
    caplog.set_level(logging.WARNING, logger="fastproxy")
    with admin_interposer(emu.admin_endpoint, mode) as endpoint, api_proxy(endpoint) as ap:
        wait_until(lambda: ap.counts()[1] >= 1, "the certificate to be refused")
        assert ap.source.current() is None
        refused_with_nothing_forwarded(ap.port)
        assert ap.proxy.stats()["connected_total"] == 0
    lines = refresh_warnings(caplog)
    assert lines and all(reason in m and f"instance {SHORT}" in m for m in lines), lines
    refused = warnings_for(caplog, SHORT)
    assert len(refused) == 1 and reason in refused[0], refused


def test_ca_rotation_fails_one_dial_forces_a_refresh_and_service_resumes(
    emu: EmulatorProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fastproxy")
    with api_proxy(emu.admin_endpoint) as ap:
        wait_until(lambda: ap.counts() == (1, 0), "the first certificate")
        old = ap.generation()
        held = connect(ap.port)
        echo(held, b"before the CA changes")
        emu_post(emu, "rotate-ca", {"cluster": URI.cluster_parent})
        # The old CA no longer verifies the server: this dial fails and forces a refresh
        # (protocol §5.5), within the burst of the rate limiter.
        refused_with_nothing_forwarded(ap.port)
        wait_until(lambda: ap.counts()[0] == 2, "the forced refresh")
        assert ap.generation() > old
        echo_once(ap.port)
        echo(held, b"the session in flight keeps its TLS connection")
        held.close()
        assert ap.proxy.stats()["dial_failures"] == 1
    failed = warnings_for(caplog, SHORT)
    assert len(failed) == 1, failed
    assert "certificate verify failed" in failed[0], failed[0]
    assert refresh_warnings(caplog) == []


# --- slow peers -----------------------------------------------------------------------------------


def test_clients_that_never_send_hold_no_buffers_and_do_not_slow_others(
    emulator_echo: EmulatorProcess,
) -> None:
    """Slowloris: many clients connect and never send. Each is dialled and spliced (the Auth
    Proxy has no idle timeout either), holds no buffer slab, and the loop keeps serving others."""
    from tests.inproc_support import echo_source

    idle_count = 200
    listener = Listener.tcp("127.0.0.1", 0, echo_source(emulator_echo))
    with running_proxy([listener]) as proxy:
        idle = [connect(listener.port) for _ in range(idle_count)]
        try:
            wait_until(
                lambda: proxy.stats()["connected_total"] == idle_count, "every idle client spliced"
            )
            assert on_loop(proxy, lambda: proxy.pool.in_use) == 0
            with connect(listener.port) as busy:
                echo(busy, os.urandom(1 << 20))  # more than the pool's slabs in flight at once
            age = proxy.heartbeat_age()
            assert age is not None and age < 2.0, age
            # A client that dribbles one byte at a time is served byte by byte.
            with connect(listener.port) as dribble:
                for b in b"slow":
                    echo(dribble, bytes([b]))
            assert on_loop(proxy, lambda: proxy.pool.in_use) == 0
        finally:
            for s in idle:
                s.close()
        wait_idle(proxy)
        assert proxy.stats()["closed_error"] == 0


# --- max connections and /readiness, on the real process -----------------------------------------


def _health_base(proxy: Any) -> str:
    m = re.search(r"Health and metrics server listening on (\S+):(\d+)", proxy.output())
    assert m, proxy.output()
    return f"http://127.0.0.1:{m.group(2)}"


def _readiness(base: str) -> tuple[int, str]:
    r = requests.get(base + "/readiness", timeout=10)
    return r.status_code, r.text


def test_max_connections_next_client_waits_in_the_backlog_and_readiness_follows(
    emulator_echo: EmulatorProcess, proxy_factory: Callable[..., Any], tmp_path: Any
) -> None:
    import select

    from tests.e2e_support import write_static_info

    static = write_static_info(emulator_echo, "echo-token", tmp_path / "static.json")
    proxy = proxy_factory(
        DEMO_URI, "--static-connection-info", str(static), "--token", "echo-token",
        "--port", "0", "--max-connections", "2",
        "--health-check", "--prometheus", "--http-port", "0",
    )  # fmt: skip
    base = _health_base(proxy)
    assert _readiness(base) == (200, "ok")
    first, second = connect(proxy.port), connect(proxy.port)
    echo(first, b"one")
    echo(second, b"two")
    wait_until(lambda: _readiness(base)[0] == 503, "/readiness to report the limit")
    assert "max connections reached (2/2)" in _readiness(base)[1]
    third = connect(proxy.port)  # the kernel completes it: it waits in the backlog
    third.sendall(b"three")
    readable, _, _ = select.select([third], [], [], 1.0)
    assert not readable, "the third client was served beyond --max-connections"
    echo(second, b"the admitted ones keep flowing")
    first.close()
    assert recv_exactly(third, 5) == b"three"  # served once a slot freed
    echo(third, b"and onwards")
    assert _readiness(base)[0] == 503  # the third took the slot
    second.close()
    wait_until(lambda: _readiness(base) == (200, "ok"), "/readiness to recover")
    metrics = requests.get(base + "/metrics", timeout=10).text
    m = re.search(r'fastproxy_connections_refused_total\{reason="max_connections"\} (\S+)', metrics)
    assert m and float(m.group(1)) >= 1, metrics
    third.close()
    assert "Traceback" not in proxy.output()


# --- soak: churn at several hundred connections -----------------------------------------------


class _Churn:
    """Client threads against the proxy: ``idle`` hold one connection each and ping it now and
    then, ``churners`` open, echo 1-5 payloads and close, again and again. Every echo is
    compared byte for byte; every failure is kept."""

    def __init__(self, port: int, *, idle: int, churners: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.opened = 0
        self.echoes = 0
        self.failures: list[str] = []
        self.threads = [
            threading.Thread(target=self._idle, args=(i,), daemon=True) for i in range(idle)
        ] + [threading.Thread(target=self._churn, args=(i,), daemon=True) for i in range(churners)]

    def _count(self, opened: int = 0, echoes: int = 0) -> None:
        with self.lock:
            self.opened += opened
            self.echoes += echoes

    def _fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)

    def _roundtrip(self, sock: socket.socket, rnd: Any) -> None:
        payload = rnd.randbytes(rnd.randint(1, 8192))
        sock.sendall(payload)
        got = recv_exactly(sock, len(payload))
        if got != payload:
            raise AssertionError(f"corrupted echo of {len(payload)} bytes")

    def _idle(self, seed: int) -> None:
        import random

        rnd = random.Random(seed)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
                self._count(opened=1)
                while not self.stop.wait(rnd.uniform(0.5, 2.0)):
                    self._roundtrip(sock, rnd)
                    self._count(echoes=1)
        except BaseException as exc:
            self._fail(f"idle {seed}: {exc!r}")

    def _churn(self, seed: int) -> None:
        import random

        rnd = random.Random(1000 + seed)
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
                    self._count(opened=1)
                    for _ in range(rnd.randint(1, 5)):
                        self._roundtrip(sock, rnd)
                        self._count(echoes=1)
            except BaseException as exc:
                self._fail(f"churn {seed}: {exc!r}")
                return

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    m = re.search(r"^" + pattern + r"$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [
        "bounded",
        pytest.param("long", marks=[*long_only, pytest.mark.timeout(1200)]),
    ],
)
def test_soak_churn_keeps_memory_and_descriptors_flat_and_counters_consistent(
    emulator_echo: EmulatorProcess, proxy_factory: Callable[..., Any], tmp_path: Any, variant: str
) -> None:
    """Several hundred connections churning through one proxy process. RSS and descriptor
    count sampled throughout; after warm-up neither may grow by 5 % or more (bounded variant:
    a looser RSS bound, it is too short for allocator arenas to settle); at the end every
    connection is accounted for in /metrics and the descriptors are back to the idle count."""
    from tests.e2e_support import fd_count, rss_kib, write_static_info

    long = variant == "long"
    duration = 600.0 if long else 15.0
    warmup = 120.0 if long else 5.0
    idle, churners = (150, 250) if long else (60, 140)
    rss_bound = 0.05 if long else 0.25
    static = write_static_info(emulator_echo, "echo-token", tmp_path / "static.json")
    proxy = proxy_factory(
        DEMO_URI, "--static-connection-info", str(static), "--token", "echo-token",
        "--port", "0", "--prometheus", "--http-port", "0",
    )  # fmt: skip
    base = _health_base(proxy)
    pid = proxy.proc.pid
    fds_idle = fd_count(pid)
    churn = _Churn(proxy.port, idle=idle, churners=churners)
    t0 = time.monotonic()
    churn.start()
    samples: list[tuple[float, int, int, int]] = []  # (t, RSS KiB, descriptors, open conns)
    while time.monotonic() - t0 < duration and not churn.failures:
        time.sleep(1.0 if long else 0.5)  # the sampling period
        active = _metric(
            requests.get(base + "/metrics", timeout=10).text, "fastproxy_connections_active"
        )
        samples.append((time.monotonic() - t0, rss_kib(pid), fd_count(pid), int(active)))
    churn.finish()
    assert not churn.failures, churn.failures[:5]

    steady = [s for s in samples if s[0] >= warmup]
    assert len(steady) >= 10, samples
    head = steady[: max(3, len(steady) // 10)]
    tail = steady[-max(3, len(steady) // 10) :]
    rss0 = sorted(s[1] for s in head)[len(head) // 2]
    rss1 = max(s[1] for s in tail)
    # Descriptors follow the connections open at the sampling instant (two each): what must stay
    # flat is the rest, descriptors minus twice the open connections.
    fds0 = sorted(s[2] - 2 * s[3] for s in head)[len(head) // 2]
    fds1 = sorted(s[2] - 2 * s[3] for s in tail)[len(tail) // 2]
    concurrent = idle + churners
    print(
        f"\nsoak ({variant}): {churn.opened} connections, {churn.echoes} echoes in "
        f"{duration:.0f} s at {concurrent} concurrent clients; RSS {rss0} -> {rss1} KiB "
        f"({(rss1 - rss0) / rss0:+.1%}); descriptors beyond two per open connection {fds0} -> "
        f"{fds1} (idle process: {fds_idle}); peak {max(s[2] for s in samples)} descriptors"
    )
    assert rss1 <= rss0 * (1 + rss_bound), f"RSS grew from {rss0} to {rss1} KiB"
    # Two descriptors per open connection; a churner's previous connection may still be closing
    # (half-close handshake with the instance) when it opens the next.
    assert max(s[2] for s in samples) <= fds_idle + 2 * (idle + 2 * churners) + 16
    assert fds1 <= max(fds0 * 1.05, fds0 + 8), f"descriptors: {fds0} -> {fds1} beyond the open ones"

    def settled() -> bool:
        text = requests.get(base + "/metrics", timeout=10).text
        return _metric(text, "fastproxy_connections_active") == 0

    wait_until(settled, "every connection to be closed", timeout=60)
    wait_until(lambda: fd_count(pid) <= fds_idle, "descriptors back to the idle count", timeout=30)
    text = requests.get(base + "/metrics", timeout=10).text
    accepted = _metric(text, "fastproxy_connections_accepted_total", instance=SHORT)
    closed_ok = _metric(text, "fastproxy_connections_closed_total", result="ok")
    closed_error = _metric(text, "fastproxy_connections_closed_total", result="error")
    assert accepted == churn.opened, (accepted, churn.opened)
    assert closed_ok + closed_error == accepted, (closed_ok, closed_error, accepted)
    assert closed_error == 0
    assert "Traceback" not in proxy.output()


# --- signals under load -----------------------------------------------------------------------


class _Streamer(threading.Thread):
    """Streams checksummed data through the echo backend until told to finish, then half-closes
    and checks that everything came back; ``cut`` if the proxy closed it first."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        self.finish = threading.Event()
        self.ok = False
        self.cut = False
        self.error: BaseException | None = None

    def run(self) -> None:
        import hashlib

        sent, got = hashlib.sha256(), hashlib.sha256()
        n_sent = n_got = 0
        try:
            while not self.finish.is_set():
                block = os.urandom(32 * 1024)
                self.sock.sendall(block)
                sent.update(block)
                n_sent += len(block)
                while n_got < n_sent:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        self.cut = True
                        return
                    got.update(chunk)
                    n_got += len(chunk)
            self.sock.shutdown(socket.SHUT_WR)
            rest = recv_eof(self.sock)
            got.update(rest)
            n_got += len(rest)
            self.ok = n_got == n_sent and got.digest() == sent.digest()
        except (ConnectionError, TimeoutError, OSError):
            self.cut = True
        except BaseException as exc:
            self.error = exc
        finally:
            self.sock.close()


@pytest.mark.parametrize("delay", ["none", "min", "max"])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_during_load_drains_as_configured_without_a_traceback(
    emulator_echo: EmulatorProcess, proxy_factory: Callable[..., Any], tmp_path: Any,
    sig: str, delay: str,
) -> None:  # fmt: skip
    import signal as signals

    from tests.e2e_support import write_static_info

    static = write_static_info(emulator_echo, "echo-token", tmp_path / "static.json")
    flags = {
        "none": [],
        "min": ["--min-sigterm-delay", "1s"],
        "max": ["--max-sigterm-delay", "20s"],
    }[delay]
    proxy = proxy_factory(
        DEMO_URI, "--static-connection-info", str(static), "--token", "echo-token",
        "--port", "0", *flags,
    )  # fmt: skip
    streams = [_Streamer(proxy.port) for _ in range(4)]
    for s in streams:
        s.start()
    wait_until(lambda: all(s.is_alive() for s in streams), "the streams to run")
    time.sleep(0.5)  # half a second of load before the signal
    t0 = time.monotonic()
    proxy.proc.send_signal(getattr(signals, sig))
    if delay == "min":
        echo_once(proxy.port, b"accepted during --min-sigterm-delay")
    if delay == "max":
        for s in streams:
            s.finish.set()  # the clients finish their work during the drain
    rc = proxy.proc.wait(timeout=30)
    elapsed = time.monotonic() - t0
    for s in streams:
        s.finish.set()
        s.join(WAIT_S)
        assert s.error is None, s.error
    out = proxy.output()
    assert rc == (143 if sig == "SIGTERM" else 130), out
    assert "Traceback" not in out
    if delay == "max":
        assert all(s.ok for s in streams), "a stream lost data during the drain"
        assert elapsed < 15, elapsed  # exited when the last connection closed, not at 20 s
    else:
        assert all(s.cut or s.ok for s in streams)
        assert elapsed < (1.0 if delay == "min" else 0.0) + PROMPT_S, elapsed
        if delay == "min":
            assert elapsed >= 0.9, elapsed
