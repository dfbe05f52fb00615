"""Cost of the TLS pump per 64 KiB of plaintext, in memory (no sockets, no kernel copies).

Run with ``pytest perf/bench_tls.py`` (pytest-benchmark). The peer is a pyOpenSSL server
``Connection`` on memory BIOs. Four numbers:

* ``c2s_client_only``: ``send(memoryview)`` + ``outgoing()``; what the proxy pays per 64 KiB going
  up (the ciphertext is dropped; the server never reads it).
* ``c2s_roundtrip``: the same plus the server decrypting it, so both ends stay in step.
* ``s2c_server_only``: the server encrypting 64 KiB and reading the ciphertext out: a baseline.
* ``s2c_roundtrip``: server encrypts, ``receive_ciphertext`` + ``recv_into`` a 64 KiB slab until
  all is read. The proxy's own cost going down is ``s2c_roundtrip - s2c_server_only``.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import pytest
from OpenSSL import SSL

from fastproxy.tls import TLSClientSession
from tests.test_tls import DIAL_IP, PyOpenSSLServer, Wire, default_pki, make_pyopenssl

CHUNK = 64 * 1024


@pytest.fixture
def pair() -> tuple[TLSClientSession, PyOpenSSLServer]:
    pki = default_pki()
    client = TLSClientSession(pki.client_context(), DIAL_IP)
    server = make_pyopenssl(pki, Path("."))
    assert isinstance(server, PyOpenSSLServer)
    wire = Wire(client, server, random.Random(0), 1 << 20)
    wire.handshake()
    wire.flush()
    assert client.recv_into(memoryview(bytearray(16))) is None  # consume the session tickets
    return client, server


def test_c2s_client_only(benchmark, pair: tuple[TLSClientSession, PyOpenSSLServer]) -> None:  # type: ignore[no-untyped-def]
    client, _ = pair
    data = memoryview(bytes(range(256)) * (CHUNK // 256))

    def once() -> int:
        n = client.send(data)
        return n + len(client.outgoing())

    assert benchmark(once) > CHUNK


def test_c2s_roundtrip(benchmark, pair: tuple[TLSClientSession, PyOpenSSLServer]) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    data = memoryview(bytes(range(256)) * (CHUNK // 256))
    sink = memoryview(bytearray(CHUNK))
    conn = server.conn

    def once() -> int:
        client.send(data)
        conn.bio_write(client.outgoing())
        got = 0
        while got < CHUNK:
            got += conn.recv_into(sink[got:])
        return got

    assert benchmark(once) == CHUNK


def test_s2c_server_only(benchmark, pair: tuple[TLSClientSession, PyOpenSSLServer]) -> None:  # type: ignore[no-untyped-def]
    _, server = pair
    data = memoryview(bytes(range(256)) * (CHUNK // 256))
    conn = server.conn

    def once() -> int:
        conn.sendall(data)
        return len(conn.bio_read(1 << 20))

    assert benchmark(once) > CHUNK


def test_s2c_roundtrip(benchmark, pair: tuple[TLSClientSession, PyOpenSSLServer]) -> None:  # type: ignore[no-untyped-def]
    client, server = pair
    data = memoryview(bytes(range(256)) * (CHUNK // 256))
    slab = memoryview(bytearray(CHUNK))
    conn = server.conn

    def once() -> int:
        conn.sendall(data)
        client.receive_ciphertext(conn.bio_read(1 << 20))
        got = 0
        while got < CHUNK:
            n = client.recv_into(slab[got:])
            assert n
            got += n
        return got

    assert benchmark(once) == CHUNK


def test_handshake(benchmark) -> None:  # type: ignore[no-untyped-def]
    """One full TLS 1.3 handshake with client certificate, both ends (RSA 2048 everywhere)."""
    pki = default_pki()
    ctx = pki.client_context()
    server_ctx = make_pyopenssl(pki, Path("."))
    assert isinstance(server_ctx, PyOpenSSLServer)
    sctx = server_ctx.conn.get_context()

    def once() -> bool:
        client = TLSClientSession(ctx, DIAL_IP)
        server = SSL.Connection(sctx, None)
        server.set_accept_state()
        client.do_handshake()
        server.bio_write(client.outgoing())
        with contextlib.suppress(SSL.WantReadError):
            server.do_handshake()
        client.receive_ciphertext(server.bio_read(1 << 20))
        done = client.do_handshake()
        server.bio_write(client.outgoing())
        server.do_handshake()
        return done

    assert benchmark(once)
