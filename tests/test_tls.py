"""The TLS pump, in memory: our client session against two independent server implementations.

No sockets. Ciphertext is moved between :class:`fastproxy.tls.TLSClientSession` and either a
pyOpenSSL server ``Connection`` on memory BIOs or the standard library's ``SSLObject`` over
``ssl.MemoryBIO`` (a different OpenSSL build: the system one), with every delivery split at random
points, because a real socket never promises one read per TLS record.

The test PKI (module-level helpers, no conftest): a root CA that signs the server certificates and
an intermediate "client CA", which signs the client leaf (EKU clientAuth). The client presents
``[leaf, intermediate, root]``; the servers trust the root only, so a handshake that succeeds also
proves the intermediate was sent.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import ipaddress
import random
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL, crypto

from fastproxy.errors import TLSFailure
from fastproxy.tls import (
    OUTGOING_CHUNK,
    TLSClientSession,
    _dns_matches,
    check_server_name,
    parse_server_address,
)
from fastproxy.tlsctx import build_client_context

DIAL_IP = "127.0.0.2"
PSC_NAME = "x.y.alloydb.goog"
SERVER_SANS: tuple[str, ...] = (DIAL_IP, PSC_NAME)

# ---------------------------------------------------------------------------------------------
# Test PKI
# ---------------------------------------------------------------------------------------------


@functools.cache
def rsa_key(label: str) -> rsa.RSAPrivateKey:
    """One 2048-bit key per label, generated once per test session (generation is slow)."""
    del label
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_cert(
    cn: str,
    key: rsa.RSAPrivateKey,
    issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None,
    *,
    ca: bool = False,
    sans: Sequence[str] = (),
    client: bool = False,
    days: int = 1,
) -> x509.Certificate:
    """A certificate for ``key``; self-signed when ``issuer`` is None."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_name, signing_key = (name, key) if issuer is None else (issuer[0].subject, issuer[1])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        entries: list[x509.GeneralName] = []
        for san in sans:
            try:
                entries.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                entries.append(x509.DNSName(san))
        builder = builder.add_extension(x509.SubjectAlternativeName(entries), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class PKI:
    root: x509.Certificate
    root_key: rsa.RSAPrivateKey
    client_ca: x509.Certificate
    client_key: rsa.RSAPrivateKey
    client_cert: x509.Certificate
    server_key: rsa.RSAPrivateKey
    server_cert: x509.Certificate

    @property
    def client_chain(self) -> list[bytes]:
        """What the Admin API returns as ``pemCertificateChain``: leaf, intermediate, root."""
        return [pem(self.client_cert), pem(self.client_ca), pem(self.root)]

    def client_context(self) -> SSL.Context:
        return build_client_context(self.client_chain, self.client_key, pem(self.root))

    def server_with(self, sans: Sequence[str]) -> PKI:
        """The same PKI with a different server certificate (signed by the same root)."""
        cert = make_cert("server-variant", self.server_key, (self.root, self.root_key), sans=sans)
        return self._replace_server(cert)

    def _replace_server(self, cert: x509.Certificate) -> PKI:
        return PKI(
            self.root,
            self.root_key,
            self.client_ca,
            self.client_key,
            self.client_cert,
            self.server_key,
            cert,
        )


def make_pki(name: str = "main", sans: Sequence[str] = SERVER_SANS) -> PKI:
    root_key = rsa_key(f"{name}-root")
    root = make_cert(f"{name} root CA", root_key, None, ca=True)
    ca_key = rsa_key(f"{name}-client-ca")
    client_ca = make_cert(f"{name} client CA", ca_key, (root, root_key), ca=True)
    client_key = rsa_key("client")  # the proxy's one RSA key, reused across generations
    client_cert = make_cert("client", client_key, (client_ca, ca_key), client=True)
    server_key = rsa_key("server")
    server_cert = make_cert("uid.server.alloydb", server_key, (root, root_key), sans=sans)
    return PKI(root, root_key, client_ca, client_key, client_cert, server_key, server_cert)


@functools.cache
def default_pki() -> PKI:
    return make_pki()


@functools.cache
def other_pki() -> PKI:
    """An unrelated PKI: a different root, for wrong-CA tests."""
    return make_pki("other")


# ---------------------------------------------------------------------------------------------
# Servers on memory BIOs
# ---------------------------------------------------------------------------------------------


class Server(Protocol):
    """What the pump needs from the other end, whichever TLS library implements it."""

    sni: str | None

    def feed(self, data: bytes) -> None: ...
    def feed_eof(self) -> None: ...
    def drain(self) -> bytes: ...
    def handshake(self) -> bool: ...
    def read(self) -> bytes | None:
        """Plaintext, None when it wants more ciphertext, b"" at close_notify."""

    def write(self, data: bytes) -> None: ...
    def close_write(self) -> None: ...


def pyopenssl_server_context(
    pki: PKI,
    *,
    trust: x509.Certificate | None = None,
    max_version: int = SSL.TLS1_3_VERSION,
    require_client_cert: bool = True,
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_max_proto_version(max_version)
    ctx.use_certificate(pki.server_cert)
    ctx.use_privatekey(pki.server_key)
    store = ctx.get_cert_store()
    assert store is not None
    store.add_cert(crypto.X509.from_cryptography(trust or pki.root))
    mode = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT if require_client_cert else 0
    ctx.set_verify(mode or SSL.VERIFY_NONE)
    return ctx


class PyOpenSSLServer:
    def __init__(self, ctx: SSL.Context) -> None:
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_accept_state()
        self.done = False
        self.sni: str | None = None

    def feed(self, data: bytes) -> None:
        self.conn.bio_write(data)

    def feed_eof(self) -> None:
        self.conn.bio_shutdown()

    def drain(self) -> bytes:
        out = bytearray()
        while True:
            try:
                out += self.conn.bio_read(1 << 20)
            except SSL.WantReadError:
                return bytes(out)

    def handshake(self) -> bool:
        if not self.done:
            try:
                self.conn.do_handshake()
            except SSL.WantReadError:
                return False
            self.done = True
            name = self.conn.get_servername()
            self.sni = name.decode() if name is not None else None
        return True

    def read(self) -> bytes | None:
        try:
            return self.conn.recv(1 << 16)
        except SSL.WantReadError:
            return None
        except SSL.ZeroReturnError:
            return b""

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self.conn.send(view) :]

    def close_write(self) -> None:
        self.conn.shutdown()


def stdlib_server_context(
    pki: PKI, tmp: Path, *, max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
) -> ssl.SSLContext:
    cert_file, key_file = tmp / "server.pem", tmp / "server.key"
    cert_file.write_bytes(pem(pki.server_cert))
    key_file.write_bytes(
        pki.server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.maximum_version = max_version
    ctx.load_cert_chain(cert_file, key_file)
    ctx.load_verify_locations(cadata=pem(pki.root).decode())
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class StdlibServer:
    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.sni: str | None = None

        def on_sni(obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            self.sni = name

        ctx.sni_callback = on_sni
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.done = False

    def feed(self, data: bytes) -> None:
        self.incoming.write(data)

    def feed_eof(self) -> None:
        self.incoming.write_eof()

    def drain(self) -> bytes:
        return self.outgoing.read()

    def handshake(self) -> bool:
        if not self.done:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                return False
            self.done = True
        return True

    def read(self) -> bytes | None:
        try:
            return self.obj.read(1 << 16)
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLZeroReturnError:
            return b""

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self.obj.write(view) :]

    def close_write(self) -> None:
        # unwrap() sends close_notify, then wants the peer's: that wait is not ours.
        with contextlib.suppress(ssl.SSLWantReadError):
            self.obj.unwrap()


# ---------------------------------------------------------------------------------------------
# The wire: random splits in both directions
# ---------------------------------------------------------------------------------------------


class Wire:
    """Moves ciphertext between the client session and a server, splitting it at random.

    ``max_chunk`` bounds one delivery; each delivery takes 1..min(max_chunk, pending) bytes.
    """

    def __init__(
        self, client: TLSClientSession, server: Server, rng: random.Random, max_chunk: int
    ) -> None:
        self.client, self.server, self.rng, self.max_chunk = client, server, rng, max_chunk
        self.to_server = bytearray()
        self.to_client = bytearray()

    def collect(self) -> None:
        while chunk := self.client.outgoing():
            self.to_server += chunk
        self.to_client += self.server.drain()

    def _take(self, pending: bytearray) -> bytes:
        n = self.rng.randint(1, min(self.max_chunk, len(pending)))
        data = bytes(pending[:n])
        del pending[:n]
        return data

    def step(self) -> bool:
        """Collect what both ends produced, deliver one random piece each way; False if idle."""
        self.collect()
        moved = False
        if self.to_server:
            self.server.feed(self._take(self.to_server))
            moved = True
        if self.to_client:
            self.client.receive_ciphertext(memoryview(self._take(self.to_client)))
            moved = True
        return moved

    def flush(self) -> None:
        """Deliver everything pending, still in random pieces."""
        while self.step():
            pass

    def handshake(self, limit: int = 1_000_000) -> None:
        client_done = server_done = False
        for _ in range(limit):
            client_done = client_done or self.client.do_handshake()
            server_done = server_done or self.server.handshake()
            if not self.step() and client_done and server_done:
                return
        raise AssertionError("handshake did not finish")


def client_read_all(client: TLSClientSession, slab: memoryview) -> tuple[bytes, bool]:
    """Everything the client can decrypt now (the drain rule), and whether it saw close_notify."""
    out = bytearray()
    while True:
        n = client.recv_into(slab)
        if n is None:
            return bytes(out), False
        if n == 0:
            return bytes(out), True
        out += slab[:n]


def server_read_all(server: Server) -> tuple[bytes, bool]:
    out = bytearray()
    while True:
        data = server.read()
        if data is None:
            return bytes(out), False
        if data == b"":
            return bytes(out), True
        out += data


def client_send_all(wire: Wire, data: bytes, slab_size: int = 65536) -> None:
    view = memoryview(data)
    while view:
        piece = view[:slab_size]
        while piece:
            n = wire.client.send(piece)
            piece = piece[n:]
            wire.step()
        view = view[slab_size:]


ServerFactory = Callable[[PKI, Path], Server]


def make_pyopenssl(pki: PKI, tmp: Path) -> Server:
    return PyOpenSSLServer(pyopenssl_server_context(pki))


def make_stdlib(pki: PKI, tmp: Path) -> Server:
    return StdlibServer(stdlib_server_context(pki, tmp))


SERVERS = pytest.mark.parametrize(
    "make_server", [make_pyopenssl, make_stdlib], ids=["pyopenssl", "stdlib"]
)


def connect(
    make_server: ServerFactory,
    tmp: Path,
    seed: int,
    *,
    pki: PKI | None = None,
    address: str = DIAL_IP,
    max_chunk: int | None = None,
) -> Wire:
    pki = pki or default_pki()
    rng = random.Random(seed)
    client = TLSClientSession(pki.client_context(), address)
    wire = Wire(client, make_server(pki, tmp), rng, max_chunk or rng.choice([1, 3, 17, 200, 5000]))
    wire.handshake()
    return wire


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@SERVERS
@pytest.mark.parametrize("seed", range(4))
def test_handshake_and_small_exchange(
    make_server: ServerFactory, tmp_path: Path, seed: int
) -> None:
    wire = connect(make_server, tmp_path, seed)
    client = wire.client
    assert client.handshake_done
    assert client.version == "TLSv1.3"
    assert wire.server.sni is None  # IP literal: no SNI

    slab = memoryview(bytearray(4096))
    client_send_all(wire, b"hello server")
    wire.flush()
    assert server_read_all(wire.server) == (b"hello server", False)
    wire.server.write(b"hello client")
    wire.flush()
    assert client_read_all(client, slab) == (b"hello client", False)


# Each example is a full RSA handshake: 50 keep this under two seconds, whatever the profile.
@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    max_chunk=st.integers(1, 3000),
    size=st.integers(1, 40_000),
    send_slab=st.integers(1, 20_000),
    recv_slab=st.integers(1, 20_000),
)
def test_random_splits_property(
    seed: int, max_chunk: int, size: int, send_slab: int, recv_slab: int
) -> None:
    """Whatever the split points and buffer sizes, the bytes arrive intact in both directions."""
    rng = random.Random(seed)
    pki = default_pki()
    client = TLSClientSession(pki.client_context(), DIAL_IP)
    wire = Wire(client, PyOpenSSLServer(pyopenssl_server_context(pki)), rng, max_chunk)
    wire.handshake()
    payload = rng.randbytes(size)
    client_send_all(wire, payload, slab_size=send_slab)
    wire.flush()
    assert server_read_all(wire.server)[0] == payload
    wire.server.write(payload[::-1])
    wire.flush()
    slab = memoryview(bytearray(recv_slab))
    assert client_read_all(client, slab)[0] == payload[::-1]


@SERVERS
@pytest.mark.parametrize("seed", range(2))
def test_megabyte_each_way(make_server: ServerFactory, tmp_path: Path, seed: int) -> None:
    wire = connect(make_server, tmp_path, seed, max_chunk=20_000)
    rng = random.Random(seed)
    up, down = rng.randbytes(1 << 20), rng.randbytes(1 << 20)
    slab = memoryview(bytearray(65536))

    client_send_all(wire, up)
    wire.flush()
    assert server_read_all(wire.server)[0] == up

    received = bytearray()
    for i in range(0, len(down), 50_000):
        wire.server.write(down[i : i + 50_000])
        while wire.step():
            received += client_read_all(wire.client, slab)[0]
    received += client_read_all(wire.client, slab)[0]
    assert bytes(received) == down


@SERVERS
def test_data_right_behind_the_handshake_is_not_lost(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    """Server: NewSessionTicket + data in one delivery; client: Finished + data in one delivery.

    The client uses a 7-byte buffer, so most plaintext stays buffered inside OpenSSL and only the
    drain rule (call recv_into until None, without new ciphertext) gets it out.
    """
    pki = default_pki()
    client = TLSClientSession(pki.client_context(), DIAL_IP)
    server = make_server(pki, tmp_path)
    wire = Wire(client, server, random.Random(7), max_chunk=10**9)
    # Drive the handshake by hand, delivering each flight whole.
    while not client.do_handshake():
        wire.collect()
        server.feed(bytes(wire.to_server))
        wire.to_server.clear()
        server.handshake()
        wire.collect()
        client.receive_ciphertext(bytes(wire.to_client))
        wire.to_client.clear()
    # Client: Finished and the first request leave together.
    assert client.send(memoryview(b"request")) == len(b"request")
    wire.collect()
    server.feed(bytes(wire.to_server))
    wire.to_server.clear()
    assert server.handshake()
    assert server_read_all(server)[0] == b"request"
    # Server: tickets and two responses arrive in a single delivery.
    server.write(b"response-1;")
    server.write(b"response-2 and more" * 20)
    wire.collect()
    client.receive_ciphertext(bytes(wire.to_client))
    wire.to_client.clear()
    got, closed = client_read_all(client, memoryview(bytearray(7)))
    assert not closed
    assert got == b"response-1;" + b"response-2 and more" * 20


def test_half_rtt_data_in_the_handshake_flight_is_not_lost() -> None:
    """0.5-RTT: server data sent right after its Finished, in the same flight as the handshake.

    Neither pyOpenSSL nor the stdlib exposes server-side 0.5-RTT writes, so this test reaches
    into the cffi binding (test code only): SSL_read_early_data lets the server write with
    SSL_write_early_data before the client's Finished. The client's do_handshake consumes the
    handshake records; the data record stays in the read BIO for recv_into.
    """
    from OpenSSL._util import ffi, lib

    pki = default_pki()
    sctx = pyopenssl_server_context(pki)
    lib.SSL_CTX_set_max_early_data(sctx._context, 16384)
    server = PyOpenSSLServer(sctx)
    client = TLSClientSession(pki.client_context(), DIAL_IP)
    wire = Wire(client, server, random.Random(1), max_chunk=10**9)

    assert not client.do_handshake()
    wire.collect()
    server.feed(bytes(wire.to_server))
    wire.to_server.clear()
    buf, read = ffi.new("char[]", 64), ffi.new("size_t *")
    ret = lib.SSL_read_early_data(server.conn._ssl, buf, 64, read)
    assert ret == 2  # SSL_READ_EARLY_DATA_FINISH: no early data, the handshake flight is out
    written = ffi.new("size_t *")
    half_rtt = b"0.5-RTT greeting"
    assert lib.SSL_write_early_data(server.conn._ssl, half_rtt, len(half_rtt), written) == 1
    flight = server.drain()
    client.receive_ciphertext(flight)  # ServerHello ... Finished + application data, one chunk
    assert client.do_handshake()
    slab = memoryview(bytearray(1024))
    assert client_read_all(client, slab) == (half_rtt, False)
    wire.collect()
    server.feed(bytes(wire.to_server))
    wire.to_server.clear()
    assert server.handshake()


@SERVERS
def test_clean_close(make_server: ServerFactory, tmp_path: Path) -> None:
    wire = connect(make_server, tmp_path, 1)
    wire.server.write(b"last words")
    wire.server.close_write()
    wire.flush()
    wire.client.receive_eof()  # the TCP FIN follows close_notify
    slab = memoryview(bytearray(100))
    assert client_read_all(wire.client, slab) == (b"last words", True)
    assert wire.client.peer_closed
    assert wire.client.recv_into(slab) == 0  # stays closed


@SERVERS
def test_truncation_is_an_error(make_server: ServerFactory, tmp_path: Path) -> None:
    wire = connect(make_server, tmp_path, 2)
    wire.server.write(b"partial")
    wire.flush()
    wire.client.receive_eof()  # FIN without close_notify
    slab = memoryview(bytearray(100))
    assert wire.client.recv_into(slab) == len(b"partial")
    with pytest.raises(TLSFailure, match="truncated"):
        wire.client.recv_into(slab)
    assert not wire.client.peer_closed


def test_eof_during_handshake() -> None:
    pki = default_pki()
    client = TLSClientSession(pki.client_context(), DIAL_IP)
    assert not client.do_handshake()
    assert client.outgoing()  # ClientHello
    client.receive_eof()
    with pytest.raises(TLSFailure, match=r"127\.0\.0\.2"):
        client.do_handshake()


def test_truncated_mid_record() -> None:
    wire = connect(make_pyopenssl, Path("."), 3)
    wire.server.write(b"x" * 1000)
    data = wire.server.drain()
    wire.client.receive_ciphertext(data[: len(data) // 2])
    wire.client.receive_eof()
    with pytest.raises(TLSFailure, match="truncated"):
        wire.client.recv_into(memoryview(bytearray(2000)))


@SERVERS
def test_half_close(make_server: ServerFactory, tmp_path: Path) -> None:
    """Client SHUT_WR: close_notify goes out, the server still answers, the client still reads."""
    wire = connect(make_server, tmp_path, 3)
    client_send_all(wire, b"query")
    wire.client.shutdown()
    assert wire.client.shutdown_sent
    wire.client.shutdown()  # idempotent
    wire.flush()
    assert server_read_all(wire.server) == (b"query", True)  # then close_notify

    wire.server.write(b"answer after your close_notify")
    wire.flush()
    slab = memoryview(bytearray(8))
    assert client_read_all(wire.client, slab) == (b"answer after your close_notify", False)
    wire.server.close_write()
    wire.flush()
    assert client_read_all(wire.client, slab) == (b"", True)


def test_san_mismatch() -> None:
    pki = default_pki().server_with(["127.0.0.3", "other.alloydb.goog"])
    client = TLSClientSession(pki.client_context(), DIAL_IP)
    wire = Wire(client, PyOpenSSLServer(pyopenssl_server_context(pki)), random.Random(0), 50)
    with pytest.raises(TLSFailure) as info:
        wire.handshake()
    message = str(info.value)
    assert "127.0.0.2" in message
    assert "127.0.0.3" in message and "other.alloydb.goog" in message
    assert not client.handshake_done


def test_cn_is_not_used() -> None:
    pki = default_pki()
    cert = make_cert(DIAL_IP, pki.server_key, (pki.root, pki.root_key))  # CN only, no SAN
    pki = pki._replace_server(cert)
    client = TLSClientSession(pki.client_context(), DIAL_IP)
    wire = Wire(client, PyOpenSSLServer(pyopenssl_server_context(pki)), random.Random(0), 50)
    with pytest.raises(TLSFailure, match="no subjectAltName"):
        wire.handshake()


@SERVERS
def test_wrong_ca(make_server: ServerFactory, tmp_path: Path) -> None:
    """The server's chain does not lead to the CA we were given: no fallback to system roots."""
    pki, other = default_pki(), other_pki()
    ctx = build_client_context(pki.client_chain, pki.client_key, pem(other.root))
    client = TLSClientSession(ctx, DIAL_IP)
    wire = Wire(client, make_server(pki, tmp_path), random.Random(0), 1000)
    with pytest.raises(TLSFailure, match="certificate verify failed") as info:
        wire.handshake()
    # OpenSSL servers send the chain they can build ([leaf, root]); our side names the failure.
    assert "(certificate depth" in str(info.value)
    assert "127.0.0.2" in str(info.value)


def test_tls12_only_server_pyopenssl() -> None:
    pki = default_pki()
    server = PyOpenSSLServer(pyopenssl_server_context(pki, max_version=SSL.TLS1_2_VERSION))
    client = TLSClientSession(pki.client_context(), DIAL_IP)
    wire = Wire(client, server, random.Random(0), 1000)
    with pytest.raises((TLSFailure, SSL.Error)) as info:
        wire.handshake()
    # Our side fails first or the server does; either way the client must end in TLSFailure.
    if not isinstance(info.value, TLSFailure):
        wire.collect()
        with pytest.raises(TLSFailure):
            for _ in range(10):
                wire.client.do_handshake()
                wire.step()
    assert not client.handshake_done


def test_tls12_only_server_stdlib(tmp_path: Path) -> None:
    pki = default_pki()
    ctx = stdlib_server_context(pki, tmp_path, max_version=ssl.TLSVersion.TLSv1_2)
    client = TLSClientSession(pki.client_context(), DIAL_IP)
    wire = Wire(client, StdlibServer(ctx), random.Random(0), 1000)
    failures: list[BaseException] = []
    for _ in range(100):
        try:
            client.do_handshake()
        except TLSFailure as exc:
            failures.append(exc)
            break
        with contextlib.suppress(ssl.SSLError):  # the server refuses our hello with an alert
            wire.server.handshake()
        wire.step()
    assert failures, "client did not fail against a TLS 1.2-only server"
    assert "version" in str(failures[0]).lower()


@SERVERS
def test_refused_client_certificate_surfaces_at_first_read(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    """§3.4: our handshake completes; the server's alert only shows up when we read."""
    pki, other = default_pki(), other_pki()
    # The server trusts a different client root, so it refuses our (valid) chain.
    if make_server is make_pyopenssl:
        server: Server = PyOpenSSLServer(pyopenssl_server_context(pki, trust=other.root))
    else:
        stdlib_server_context(pki, tmp_path)  # writes server.pem / server.key
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
        ctx.load_verify_locations(cadata=pem(other.root).decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
        server = StdlibServer(ctx)
    client = TLSClientSession(pki.client_context(), DIAL_IP)
    wire = Wire(client, server, random.Random(0), 300)
    server_error: Exception | None = None
    for _ in range(10_000):
        client.do_handshake()
        try:
            server.handshake()
        except (SSL.Error, ssl.SSLError) as exc:
            server_error = exc
        if not wire.step() and client.handshake_done:
            break
    assert client.handshake_done  # the client cannot tell yet
    assert server_error is not None
    with pytest.raises(TLSFailure, match="alert") as info:
        client_read_all(client, memoryview(bytearray(100)))
    assert "client certificate" in str(info.value)


def test_no_client_certificate_surfaces_at_first_read() -> None:
    pki = default_pki()
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    store = ctx.get_cert_store()
    assert store is not None
    store.add_cert(crypto.X509.from_cryptography(pki.root))
    ctx.set_verify(SSL.VERIFY_PEER)
    client = TLSClientSession(ctx, DIAL_IP)
    server = PyOpenSSLServer(pyopenssl_server_context(pki))
    wire = Wire(client, server, random.Random(0), 300)
    for _ in range(10_000):
        client.do_handshake()
        with contextlib.suppress(SSL.Error):  # the server refuses us with an alert
            server.handshake()
        if not wire.step() and client.handshake_done:
            break
    assert client.handshake_done
    with pytest.raises(TLSFailure, match="certificate required"):
        client_read_all(client, memoryview(bytearray(100)))


@SERVERS
@pytest.mark.parametrize("dialled", [PSC_NAME, PSC_NAME + ".", "X.Y.AlloyDB.Goog"])
def test_dns_name_and_sni(make_server: ServerFactory, tmp_path: Path, dialled: str) -> None:
    wire = connect(make_server, tmp_path, 5, address=dialled)
    assert wire.client.handshake_done
    assert wire.server.sni == PSC_NAME  # trailing dot stripped, lower-case


def test_dns_name_mismatch() -> None:
    pki = default_pki()
    client = TLSClientSession(pki.client_context(), "z.y.alloydb.goog")
    wire = Wire(client, PyOpenSSLServer(pyopenssl_server_context(pki)), random.Random(0), 100)
    with pytest.raises(TLSFailure, match=r"z\.y\.alloydb\.goog.*x\.y\.alloydb\.goog"):
        wire.handshake()


def test_wildcard_san_over_the_wire() -> None:
    pki = default_pki().server_with(["*.y.alloydb.goog"])
    wire = connect(make_pyopenssl, Path("."), 0, pki=pki, address=PSC_NAME)
    assert wire.client.handshake_done


@pytest.mark.parametrize(
    ("pattern", "name", "ok"),
    [
        ("x.y.alloydb.goog", "x.y.alloydb.goog", True),
        ("X.Y.ALLOYDB.GOOG.", "x.y.alloydb.goog", True),
        ("*.y.alloydb.goog", "x.y.alloydb.goog", True),
        ("*.y.alloydb.goog", "a.x.y.alloydb.goog", False),
        ("*.y.alloydb.goog", "y.alloydb.goog", False),
        ("*.goog", "alloydb.goog", False),  # a wildcard needs at least two labels after it
        ("x*.y.alloydb.goog", "xa.y.alloydb.goog", False),  # partial wildcards unsupported
        ("*.*.alloydb.goog", "x.y.alloydb.goog", False),
        ("y.alloydb.goog", "x.y.alloydb.goog", False),
    ],
)
def test_dns_matching(pattern: str, name: str, ok: bool) -> None:
    assert _dns_matches(pattern, name) is ok


def test_parse_server_address() -> None:
    assert parse_server_address("127.0.0.2") == (ipaddress.ip_address("127.0.0.2"), None)
    assert parse_server_address("[::1]") == (ipaddress.ip_address("::1"), None)
    assert parse_server_address("X.Y.alloydb.goog.") == (None, "x.y.alloydb.goog")
    with pytest.raises(ValueError):
        parse_server_address("...")


def test_ip_matching_is_exact_and_normalised() -> None:
    pki = default_pki()
    cert = make_cert("s", pki.server_key, (pki.root, pki.root_key), sans=["::1", "10.0.0.1"])
    ip, name = parse_server_address("0:0:0::1")
    check_server_name(cert, ip, name, "0:0:0::1")
    for bad in ("::2", "10.0.0.2", "::ffff:10.0.0.1"):
        ip, name = parse_server_address(bad)
        with pytest.raises(TLSFailure, match="does not match"):
            check_server_name(cert, ip, name, bad)
    # An IP literal never matches a dNSName entry that spells it.
    cert = make_cert("s", pki.server_key, (pki.root, pki.root_key), sans=["host.test"])
    cert_ip_as_dns = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(pki.server_key.public_key())
        .serial_number(1)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("10.0.0.1")]), critical=False)
        .sign(pki.root_key, hashes.SHA256())
    )
    ip, name = parse_server_address("10.0.0.1")
    with pytest.raises(TLSFailure):
        check_server_name(cert_ip_as_dns, ip, name, "10.0.0.1")


def test_outgoing_is_cheap_when_idle() -> None:
    wire = connect(make_pyopenssl, Path("."), 0)
    wire.flush()
    assert wire.client.outgoing() == b""
    assert not wire.client.has_outgoing
    assert wire.client.recv_into(memoryview(bytearray(10))) is None  # NewSessionTicket etc.
    assert wire.client.outgoing() == b""


def test_send_before_handshake_returns_zero() -> None:
    pki = default_pki()
    client = TLSClientSession(pki.client_context(), DIAL_IP)
    assert client.send(memoryview(b"too early")) == 0
    assert client.outgoing()  # it did start the handshake: ClientHello
    client.shutdown()  # no session yet: a no-op
    assert not client.shutdown_sent


def test_full_chain_is_presented() -> None:
    wire = connect(make_pyopenssl, Path("."), 0)
    server = wire.server
    assert isinstance(server, PyOpenSSLServer)
    chain = server.conn.get_peer_cert_chain(as_cryptography=True)
    assert chain is not None
    pki = default_pki()
    # Server side, OpenSSL lists the chain without the leaf.
    assert [c.subject for c in chain] == [pki.client_ca.subject, pki.root.subject]
    leaf = server.conn.get_peer_certificate(as_cryptography=True)
    assert leaf is not None and leaf.subject == pki.client_cert.subject


def test_one_big_send_and_outgoing_returns_everything() -> None:
    """Partial writes are off: one send encrypts it all; one outgoing() returns it all."""
    wire = connect(make_pyopenssl, Path("."), 0)
    wire.flush()
    data = random.Random(9).randbytes(1 << 20)
    assert wire.client.send(memoryview(data)) == len(data)
    ciphertext = wire.client.outgoing()
    assert len(ciphertext) > OUTGOING_CHUNK  # more than one bio_read, joined
    assert wire.client.outgoing() == b""
    wire.server.feed(ciphertext)
    assert server_read_all(wire.server)[0] == data


def _count_bio_swaps(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the read/write BIO replacements that actually happened (the pointer changed)."""
    swaps = {"r": 0, "w": 0}
    release_r, release_w = TLSClientSession._release_rbio, TLSClientSession._release_wbio

    def counting_r(self: TLSClientSession) -> None:
        before = self._rbio
        release_r(self)
        swaps["r"] += self._rbio != before

    def counting_w(self: TLSClientSession) -> None:
        before = self._wbio
        release_w(self)
        swaps["w"] += self._wbio != before

    monkeypatch.setattr(TLSClientSession, "_release_rbio", counting_r)
    monkeypatch.setattr(TLSClientSession, "_release_wbio", counting_w)
    return swaps


@pytest.mark.parametrize("data_path", ["fast-path"], indirect=True)  # BIOs: cffi path only
@SERVERS
def test_drained_bios_are_replaced_after_the_handshake(
    make_server: ServerFactory, tmp_path: Path, data_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSSL's memory BIOs keep their largest size: the handshake flights (certificate chains)
    would stay allocated for the connection's life. Once drained they are swapped for empty ones,
    and pyOpenSSL's own pointers follow, so its public bio_* methods keep working."""
    swaps = _count_bio_swaps(monkeypatch)
    wire = connect(make_server, tmp_path, 4)
    client = wire.client
    slab = memoryview(bytearray(4096))
    client_send_all(wire, b"ping")
    wire.flush()
    assert server_read_all(wire.server) == (b"ping", False)
    wire.server.write(b"pong")
    wire.flush()
    assert client_read_all(client, slab) == (b"pong", False)  # ends on WantRead: BIO drained
    assert swaps["r"] >= 1 and swaps["w"] >= 1
    assert client._conn._into_ssl == client._rbio
    assert client._conn._from_ssl == client._wbio
    # Small messages below BIO_RELEASE_ABOVE since the last swap: no more swaps.
    before = dict(swaps)
    client_send_all(wire, b"x")
    wire.flush()
    assert server_read_all(wire.server) == (b"x", False)
    wire.server.write(b"y")
    wire.flush()
    assert client_read_all(client, slab) == (b"y", False)
    assert swaps == before
    # The public API still reaches the live BIOs.
    wire.server.write(b"via the public API")
    wire.collect()
    client._conn.bio_write(bytes(wire.to_client))
    wire.to_client.clear()
    assert client_read_all(client, slab) == (b"via the public API", False)


@pytest.mark.parametrize("data_path", ["fast-path"], indirect=True)  # BIOs: cffi path only
def test_write_bio_is_kept_during_an_upload_and_released_after(
    data_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh write BIO grows by realloc record after record: mid-upload it is kept, and given
    back at the first drain of at most one record."""
    swaps = _count_bio_swaps(monkeypatch)
    wire = connect(make_pyopenssl, Path("."), 5)
    wire.flush()
    client = wire.client
    w0 = swaps["w"]
    chunk = random.Random(5).randbytes(64 * 1024)
    for _ in range(3):
        assert client.send(memoryview(chunk)) == len(chunk)
        wire.server.feed(client.outgoing())
        assert server_read_all(wire.server)[0] == chunk
    assert swaps["w"] == w0
    assert client.send(b"done") == 4
    wire.server.feed(client.outgoing())
    assert server_read_all(wire.server)[0] == b"done"
    assert swaps["w"] == w0 + 1


@pytest.mark.parametrize("data_path", ["fast-path"], indirect=True)  # BIOs: cffi path only
def test_read_bio_is_not_replaced_after_eof(
    data_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The EOF mark lives in the read BIO: a swap would turn a truncation into a wait."""
    swaps = _count_bio_swaps(monkeypatch)
    wire = connect(make_pyopenssl, Path("."), 6)
    wire.flush()
    slab = memoryview(bytearray(100_000))
    wire.server.write(b"z" * 50_000)  # past BIO_RELEASE_ABOVE
    wire.flush()
    r0 = swaps["r"]
    wire.client.receive_eof()
    got = 0
    with pytest.raises(TLSFailure, match="truncated"):
        while True:
            n = wire.client.recv_into(slab[got:])
            assert n, "EOF must not look like a wait or a clean close"
            got += n
    assert got == 50_000
    assert swaps["r"] == r0


# Every test above runs twice: on the direct cffi data path and on pyOpenSSL's public API (the
# fallback when its private bindings are missing), so both must behave identically.
@pytest.fixture(autouse=True, params=["fast-path", "public-api"])
def data_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    import fastproxy.tls as tls_module

    if request.param == "public-api":
        monkeypatch.setattr(tls_module, "_FAST_OK", False)
    return str(request.param)


def test_the_fast_path_is_used_with_the_installed_pyopenssl(data_path: str) -> None:
    import fastproxy.tls as tls_module

    session = TLSClientSession(default_pki().client_context(), "127.0.0.1")
    assert session._fast is (data_path == "fast-path")
    assert tls_module._FAST_OK or data_path == "public-api"
