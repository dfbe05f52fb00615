"""Helpers for the in-process proxy tests: static connection info, a proxy on a background thread,
loop-thread snapshots and deadline-bounded polling.

Nothing here sleeps to wait for a server: every wait polls a condition and fails at a deadline.
"""

from __future__ import annotations

import concurrent.futures
import copy
import datetime
import ipaddress
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fastproxy.emulator.static_info import build_static_info
from fastproxy.instance_uri import InstanceURI
from fastproxy.listener import Listener
from fastproxy.proxy import Proxy
from fastproxy.source import DialInfo, StaticSource, static_dial_info
from tests.conftest import EmulatorProcess
from tests.e2e_support import DEMO_URI
from tests.e2e_support import recv_exactly as recv_exactly  # re-exported: tests import it from here

T = TypeVar("T")

ECHO_TOKEN = "echo-token"
WAIT_S = 20.0  # generous upper bound for anything that should happen "promptly" on loopback

_static_cache: dict[str, dict[str, Any]] = {}


def echo_static_data(emu: EmulatorProcess) -> dict[str, Any]:
    """A static connection-info document for ``emu`` (cached per emulator; copy before editing)."""
    key = emu.admin_endpoint
    if key not in _static_cache:
        _static_cache[key] = build_static_info(emu.admin_endpoint, ECHO_TOKEN, [DEMO_URI])
    return copy.deepcopy(_static_cache[key])


def echo_dial_info(emu: EmulatorProcess, data: dict[str, Any] | None = None, **kw: Any) -> DialInfo:
    kw.setdefault("exchange_token", ECHO_TOKEN)
    return static_dial_info(
        data if data is not None else echo_static_data(emu), InstanceURI.parse(DEMO_URI), **kw
    )


def echo_source(
    emu: EmulatorProcess, data: dict[str, Any] | None = None, **kw: Any
) -> StaticSource:
    return StaticSource(echo_dial_info(emu, data, **kw))


def dead_address() -> str:
    """A loopback address where nothing listens on port 5433."""
    from fastproxy.emulator.__main__ import allocate_addresses

    return allocate_addresses(1, ipaddress.IPv4Address("127.0.203.1"))[0]


def self_signed_ca(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    cn: str,
    not_before: datetime.datetime,
    *,
    serial: int | None = None,
) -> x509.Certificate:
    """A CA certificate for ``key``, signed by itself, valid from ``not_before`` until a day from
    now; a random serial number unless ``serial`` is given."""
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number() if serial is None else serial)
        .not_valid_before(not_before)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def self_signed_ca_pem() -> str:
    """A CA certificate that has nothing to do with any emulator."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed_ca(key, "stranger CA", now - datetime.timedelta(minutes=5))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@contextmanager
def running_proxy(listeners: list[Listener], **kw: Any) -> Iterator[Proxy]:
    """A :class:`Proxy` serving on a background thread; stopped and joined on exit."""
    proxy = Proxy(listeners, **kw)
    thread = proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
        proxy.join(timeout=WAIT_S)
        assert not thread.is_alive(), "the proxy loop did not stop"


def on_loop(proxy: Proxy, fn: Callable[[], T], timeout: float = WAIT_S) -> T:
    """Run ``fn`` on the proxy's loop thread and return its result (a consistent snapshot)."""
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()

    def call() -> None:
        try:
            fut.set_result(fn())
        except BaseException as exc:  # handed back to the test thread
            fut.set_exception(exc)

    assert proxy.loop.call_soon_threadsafe(call), "the loop is closed"
    return fut.result(timeout)


def wait_until(pred: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll ``pred`` until it holds; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)  # polling interval between checks of a condition, not a fixed wait
        delay = min(delay * 2, 0.05)


def wait_idle(proxy: Proxy) -> None:
    """Every connection closed and every slab back in the pool (checked on the loop thread)."""
    wait_until(
        lambda: on_loop(proxy, lambda: (len(proxy.connections), proxy.pool.in_use)) == (0, 0),
        "the proxy to be idle (no connections, no slabs in use)",
    )


def connect(port: int, timeout: float = WAIT_S) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def echo(sock: socket.socket, payload: bytes) -> None:
    """Send ``payload`` and assert the same bytes come back."""
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def recv_eof(sock: socket.socket, timeout: float = WAIT_S) -> bytes:
    """Everything the peer sends until it closes (EOF or reset); fails if it never closes."""
    got = bytearray()
    sock.settimeout(timeout)
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(got)
        if not chunk:
            return bytes(got)
        got += chunk


def readable(sock: socket.socket) -> bool:
    """True if a recv would not block now (data or EOF pending)."""
    r, _, _ = select.select([sock], [], [], 0)
    return bool(r)


def rst_close(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
