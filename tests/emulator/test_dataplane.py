"""The emulator's server side over real loopback sockets, driven by standard-library TLS clients.

The clients here are the standard library's ``ssl`` (an ``SSLObject`` over a blocking socket when
the test needs to control exactly which bytes leave when, ``asyncio`` streams for concurrency);
they share no code with fastproxy's client nor with the emulator's codec, so agreement means both
follow protocol.md. The server runs on its own asyncio loop in a background thread, on ports the
OS picks. Nothing waits by sleeping: every wait is on a socket or a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fastproxy.emulator import dataplane
from fastproxy.emulator.dataplane import ServerSide
from fastproxy.emulator.pki import PKI, ClientCertificate
from fastproxy.emulator.state import (
    Backend,
    EmulatorState,
    Instance,
    InstanceName,
    IssuedCert,
)

CLUSTER = "projects/p/locations/us-central1/clusters/main"
ROT_CLUSTER = "projects/p/locations/us-central1/clusters/rotating"
URI = f"{CLUSTER}/instances/primary"
ROT_URI = f"{ROT_CLUSTER}/instances/primary"
HOST = "127.0.0.1"
ALICE = "alice@example.com"
SA = "iam-sa@demo-project.iam.gserviceaccount.com"
SA_DB_USER = "iam-sa@demo-project.iam"
TOKENS = {"alice-token": ALICE, "sa-token": SA}
IAM_PASSWORD = "emulator-iam-secret"
TIMEOUT = 20.0

# --- hand-written wire helpers (deliberately not the emulator's codec) -------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def mdx_request(token: str, auth_type: int = 1, ua: str = "dataplane-tests/1") -> bytes:
    body = b"\x0a" + _varint(len(ua)) + ua.encode()
    if auth_type:
        body += b"\x10" + _varint(auth_type)
    if token:
        body += b"\x1a" + _varint(len(token.encode())) + token.encode()
    return struct.pack(">I", len(body)) + body


MDX_OK = bytes.fromhex("00000002 0801")


def parse_mdx_response(body: bytes) -> tuple[int, str]:
    code, error, i = 0, "", 0
    while i < len(body):
        key = body[i]
        i += 1
        if key == 0x08:
            code = body[i]
            i += 1
        elif key == 0x12:
            n, shift = 0, 0
            while True:
                b = body[i]
                i += 1
                n |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            error = body[i : i + n].decode()
            i += n
        else:
            raise AssertionError(f"unexpected key {key:#x}")
    return code, error


def startup_message(user: str, database: str = "postgres", version: int = 196608) -> bytes:
    params = f"user\0{user}\0database\0{database}\0\0".encode()
    body = struct.pack(">I", version) + params
    return struct.pack(">I", len(body) + 4) + body


SSL_REQUEST = struct.pack(">II", 8, 80877103)
AUTH_CLEARTEXT = b"R" + struct.pack(">II", 8, 3)
AUTH_OK = b"R" + struct.pack(">II", 8, 0)
READY = b"Z" + struct.pack(">I", 5) + b"I"


def pg_fields(msg: bytes) -> dict[str, str]:
    assert msg[:1] == b"E", msg
    fields: dict[str, str] = {}
    for part in msg[5:].split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode()
    return fields


# --- the client -------------------------------------------------------------------------------


class TLSClient:
    """TLS 1.3 client on ``ssl.SSLObject``: the test decides what is sent in which TCP write."""

    def __init__(self, ctx: ssl.SSLContext, addr: tuple[str, int]) -> None:
        self.sock = socket.create_connection(addr, timeout=TIMEOUT)
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=addr[0])
        self.raw_in = bytearray()
        self.pending = bytearray()  # plaintext read beyond what recv_exactly returned

    def handshake(self, flush: bool = True) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                self._fill()
        if flush:
            self.flush()

    def flush(self) -> None:
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.inc.write_eof()
            return
        self.raw_in += data
        self.inc.write(data)

    def send(self, data: bytes, flush: bool = True) -> None:
        self.obj.write(data)
        if flush:
            self.flush()

    def recv(self) -> bytes:
        """Some plaintext; b"" on close_notify. Raises on alerts and truncation."""
        if self.pending:
            out = bytes(self.pending)
            self.pending.clear()
            return out
        return self._recv_tls()

    def _recv_tls(self) -> bytes:
        while True:
            try:
                return self.obj.read(65536)
            except ssl.SSLWantReadError:
                self._fill()
            except ssl.SSLZeroReturnError:
                return b""

    def recv_exactly(self, n: int) -> bytes:
        buf = self.pending
        while len(buf) < n:
            chunk = self._recv_tls()
            if not chunk:
                raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def recv_to_eof(self) -> bytes:
        buf = self.pending
        while chunk := self._recv_tls():
            buf += chunk
        out = bytes(buf)
        buf.clear()
        return out

    def exchange(self, token: str = "alice-token", auth_type: int = 1) -> tuple[int, str]:
        self.send(mdx_request(token, auth_type))
        (size,) = struct.unpack(">I", self.recv_exactly(4))
        return parse_mdx_response(self.recv_exactly(size))

    def close_notify(self) -> None:
        """Half-close at the TLS level: we send nothing more, but keep reading."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.obj.unwrap()
        self.flush()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> TLSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def expect_refused(client: TLSClient) -> None:
    """A refused client sees an alert, a reset or EOF on its first read (TLS 1.3, §3.4)."""
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        client.handshake()
        client.send(mdx_request("alice-token"))
        data = client.recv()
        if not data:
            raise ConnectionError("EOF")


# --- PKI material -----------------------------------------------------------------------------


@dataclass
class Material:
    cert: ClientCertificate
    key: rsa.RSAPrivateKey
    files: tuple[Path, Path]


def key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def client_context(
    chain_pem: str | None,
    key: rsa.RSAPrivateKey | None,
    trust_pem: str,
    tmp: Path,
    tls12: bool = False,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=trust_pem)
    if chain_pem is not None and key is not None:
        n = time.monotonic_ns()
        certfile, keyfile = tmp / f"chain-{n}.pem", tmp / f"key-{n}.pem"
        certfile.write_text(chain_pem)
        keyfile.write_bytes(key_pem(key))
        ctx.load_cert_chain(str(certfile), str(keyfile))
    return ctx


@dataclass
class Env:
    state: EmulatorState
    pki: PKI
    server: ServerSide
    loop: asyncio.AbstractEventLoop
    addr: tuple[str, int]
    rot_addr: tuple[str, int]
    key: rsa.RSAPrivateKey
    tmp: Path
    contexts: dict[tuple[str, bool], ssl.SSLContext] = field(default_factory=dict)

    def issue(
        self, cluster: str = CLUSTER, mdx: bool = True, record: bool = True, pki: PKI | None = None
    ) -> ClientCertificate:
        pub = (
            self.key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        cc = (pki or self.pki).sign_client_certificate(cluster, pub, 3600, mdx, ALICE)
        if record:
            self.state.record_issued(IssuedCert(cc.serial, cluster, mdx, cc.not_after, ALICE))
        return cc

    def ctx_for(self, cc: ClientCertificate, trust: str | None = None) -> ssl.SSLContext:
        return client_context(
            "".join(cc.chain_pems), self.key, trust or cc.ca_cert_pem, self.tmp
        )

    def ctx(self, mdx: bool = True) -> ssl.SSLContext:
        """A cached context for the main cluster (certificates signed once per module)."""
        k = (CLUSTER, mdx)
        if k not in self.contexts:
            self.contexts[k] = self.ctx_for(self.issue(mdx=mdx))
        return self.contexts[k]

    def client(self, mdx: bool = True) -> TLSClient:
        return TLSClient(self.ctx(mdx), self.addr)

    def counters(self) -> dict[str, int]:
        with self.state.lock:
            return dict(vars(self.state.counters))

    def wait_until(self, predicate: Callable[[], bool], what: str) -> None:
        """Poll a condition (not a fixed sleep) until it holds or the deadline passes."""
        deadline = time.monotonic() + TIMEOUT
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.005)

    def active(self) -> int:
        return self.counters()["connections_active"]


def _instance(uri: str) -> Instance:
    return Instance(
        name=InstanceName.parse(uri),
        instance_uid="0f6b6c1e-6d1f-4c1c-9d1a-3c2b9e0a7f11",
        ip_address=HOST,
        public_ip_address=None,
        psc_dns_name=None,
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    state = EmulatorState(
        instances={URI: _instance(URI), ROT_URI: _instance(ROT_URI)},
        tokens=dict(TOKENS),
        backend=Backend(kind="echo"),
    )
    pki = PKI()
    server = ServerSide(state, pki, port=0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="dataplane-test-loop", daemon=True)
    thread.start()
    bound = asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)
    assert len(bound) == 2  # one address per instance, in instance order
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    e = Env(state, pki, server, loop, bound[0], bound[1], key, tmp_path_factory.mktemp("dp"))
    try:
        yield e
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


@pytest.fixture(autouse=True)
def _reset(env: Env) -> Iterator[None]:
    yield
    env.state.reset_faults()
    with env.state.lock:
        env.state.backend = Backend(kind="echo")


# --- TLS policy -------------------------------------------------------------------------------


def test_mdx_ok_then_one_megabyte_echo(env: Env) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def run() -> bytes:
        reader, writer = await asyncio.open_connection(
            HOST, env.addr[1], ssl=env.ctx(), server_hostname=HOST
        )
        writer.write(mdx_request("alice-token"))
        assert await reader.readexactly(6) == MDX_OK

        async def send() -> None:
            for i in range(0, len(payload), 10_000):  # odd size: records straddle reads
                writer.write(payload[i : i + 10_000])
                await writer.drain()

        sender = asyncio.create_task(send())
        got = await reader.readexactly(len(payload))
        await sender
        writer.close()
        return got

    before = env.counters()
    assert asyncio.run(run()) == payload
    assert env.counters()["mdx_ok"] == before["mdx_ok"] + 1


def test_tls12_client_is_refused(env: Env) -> None:
    before = env.counters()["handshakes_failed"]
    cc = env.issue()
    ctx = client_context("".join(cc.chain_pems), env.key, cc.ca_cert_pem, env.tmp, tls12=True)
    with TLSClient(ctx, env.addr) as c, pytest.raises(ssl.SSLError):
        c.handshake()
    env.wait_until(lambda: env.counters()["handshakes_failed"] > before, "handshake failure")


def test_no_client_certificate_is_refused(env: Env) -> None:
    before = env.counters()["handshakes_failed"]
    cc = env.issue()
    ctx = client_context(None, None, cc.ca_cert_pem, env.tmp)
    with TLSClient(ctx, env.addr) as c:
        c.handshake()  # TLS 1.3: the client finishes before the server has judged it
        with pytest.raises(ssl.SSLError, match=r"CERTIFICATE_REQUIRED|certificate required"):
            c.recv()
    assert env.counters()["handshakes_failed"] == before + 1


def _leaf(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: rsa.RSAPublicKey,
    signer: rsa.RSAPrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """A client leaf as the emulator would make it, with whatever validity and signer."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
        .sign(signer, hashes.SHA256())
    )


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_expired_certificate_is_refused(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fastproxy.emulator.server")
    ca = env.pki.ca_for(CLUSTER)
    now = dt.datetime.now(dt.UTC)
    leaf = _leaf(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ALICE)]),
        ca.intermediate_cert.subject,
        env.key.public_key(),
        ca.intermediate_key,
        now - dt.timedelta(hours=2),
        now - dt.timedelta(hours=1),
    )
    # Recorded as issued, so only the expiry can be the reason for the refusal.
    env.state.record_issued(IssuedCert(leaf.serial_number, CLUSTER, True, 0.0, ALICE))
    chain = _pem(leaf) + ca.intermediate_pem + ca.root_pem
    before = env.counters()["handshakes_failed"]
    with TLSClient(client_context(chain, env.key, ca.root_pem, env.tmp), env.addr) as c:
        expect_refused(c)
    assert env.counters()["handshakes_failed"] == before + 1
    assert "certificate has expired" in caplog.text  # logged before the alert is sent


def test_foreign_ca_certificate_is_refused(env: Env) -> None:
    foreign = PKI()
    cc = env.issue(pki=foreign)  # same cluster name, another CA; recorded as issued
    ctx = env.ctx_for(cc, trust=env.pki.ca_for(CLUSTER).root_pem)
    before = env.counters()["handshakes_failed"]
    with TLSClient(ctx, env.addr) as c:
        expect_refused(c)
    assert env.counters()["handshakes_failed"] == before + 1


def test_self_signed_certificate_is_refused(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fastproxy.emulator.server")
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ALICE)])
    leaf = _leaf(
        name, name, env.key.public_key(), env.key, now - dt.timedelta(minutes=5),
        now + dt.timedelta(hours=1),
    )  # fmt: skip
    env.state.record_issued(IssuedCert(leaf.serial_number, CLUSTER, True, 0.0, ALICE))
    ctx = client_context(_pem(leaf), env.key, env.pki.ca_for(CLUSTER).root_pem, env.tmp)
    before = env.counters()["handshakes_failed"]
    with TLSClient(ctx, env.addr) as c:
        expect_refused(c)
    assert env.counters()["handshakes_failed"] == before + 1
    assert "client certificate rejected: self-signed certificate" in caplog.text


def test_certificate_not_issued_by_this_emulator_is_closed(env: Env) -> None:
    cc = env.issue(record=False)  # valid chain, but no IssuedCert record
    with TLSClient(env.ctx_for(cc), env.addr) as c:
        c.handshake()
        c.send(mdx_request("alice-token"))
        assert c.recv() == b""  # close_notify, no exchange reply


def test_server_presents_leaf_and_root_with_ip_san(env: Env) -> None:
    with env.client() as c:
        c.handshake()
        der = c.obj.getpeercert(binary_form=True)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert str(cn).endswith(".server.alloydb")
        assert c.obj.version() == "TLSv1.3"


# --- metadata exchange ------------------------------------------------------------------------


def test_unknown_token_gets_error(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fastproxy.emulator.server")
    before = env.counters()["mdx_refused"]
    with env.client() as c:
        c.handshake()
        code, error = c.exchange(token="nobody-knows-me")
        assert code == 2
        assert "token" in error and "not valid" in error
        assert "nobody-knows-me" not in error
        assert c.recv() == b""
    assert env.counters()["mdx_refused"] == before + 1
    assert "metadata exchange refused" in caplog.text
    assert "nobody-knows-me" not in caplog.text  # tokens never reach the log


def test_empty_token_gets_error(env: Env) -> None:
    with env.client() as c:
        c.handshake()
        code, error = c.exchange(token="")
        assert (code, error) == (2, "metadata exchange request carries no OAuth2 token")


def test_unsupported_auth_type_gets_error(env: Env) -> None:
    with env.client() as c:
        c.handshake()
        assert c.exchange(auth_type=7) == (2, "unsupported auth_type 7")


def test_oversized_and_malformed_requests_get_error(env: Env) -> None:
    with env.client() as c:
        c.handshake()
        c.send(struct.pack(">I", 16 * 1024 + 1))
        (size,) = struct.unpack(">I", c.recv_exactly(4))
        code, error = parse_mdx_response(c.recv_exactly(size))
        assert code == 2 and "exceeds" in error
    with env.client() as c:
        c.handshake()
        c.send(struct.pack(">I", 2) + b"\x0b\x00")  # a group: unsupported wire type
        (size,) = struct.unpack(">I", c.recv_exactly(4))
        code, error = parse_mdx_response(c.recv_exactly(size))
        assert code == 2 and "malformed" in error and "wire type 3" in error


def test_refusal_fault(env: Env) -> None:
    env.state.mdx_refusal = "instance is under maintenance"
    with env.client() as c:
        c.handshake()
        assert c.exchange() == (2, "instance is under maintenance")
        assert c.recv() == b""


def test_auth_type_unspecified_is_db_native(env: Env) -> None:
    with env.client() as c:
        c.handshake()
        assert c.exchange(auth_type=0) == (1, "")
        c.send(b"ping")
        assert c.recv_exactly(4) == b"ping"


def test_reply_is_one_record(env: Env) -> None:
    """Go reads the reply with two single reads: prefix and body must share a record."""
    with env.client() as c:
        c.handshake()
        mark = len(c.raw_in)
        assert c.exchange() == (1, "")
        # Records after the handshake: session tickets, then the reply. The reply is the only
        # application-data record of 6 + 1 (content type) + 16 (tag) bytes.
        lengths = _record_lengths(bytes(c.raw_in[mark:]))
        assert 6 + 17 in lengths


def test_non_mdx_certificate_skips_exchange(env: Env) -> None:
    with env.client(mdx=False) as c:
        c.handshake()
        # Bytes that look like an exchange request are just data: echoed, not answered.
        request = mdx_request("alice-token")
        c.send(request)
        assert c.recv_exactly(len(request)) == request


def test_exchange_split_into_one_byte_writes(env: Env) -> None:
    with env.client() as c:
        c.handshake()
        for b in mdx_request("alice-token"):
            c.send(bytes([b]))  # one record and one TCP write per byte
        (size,) = struct.unpack(">I", c.recv_exactly(4))
        assert parse_mdx_response(c.recv_exactly(size)) == (1, "")
        c.send(b"after")
        assert c.recv_exactly(5) == b"after"


def test_exchange_and_payload_in_one_write_with_the_finished(env: Env) -> None:
    """Finished, exchange request and first payload leave in ONE TCP write: nothing is lost."""
    with env.client() as c:
        c.handshake(flush=False)  # the client Finished is still in our outgoing BIO
        c.send(mdx_request("alice-token") + b"first-payload", flush=False)
        c.flush()
        assert c.recv_exactly(6) == MDX_OK
        assert c.recv_exactly(13) == b"first-payload"


def test_exchange_timeout(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataplane, "MDX_TIMEOUT_S", 0.2)
    with env.client() as c:
        c.handshake()
        c.send(mdx_request("alice-token")[:5])  # an incomplete request, then silence
        assert c.recv() == b""  # closed by the server's deadline


def test_drop_after_handshake(env: Env) -> None:
    env.state.drop_after_handshake = True
    with env.client() as c:
        c.handshake()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            c.send(mdx_request("alice-token"))
            if not c.recv():
                raise ConnectionError("EOF")


def _record_lengths(raw: bytes) -> list[int]:
    lengths, i = [], 0
    while i + 5 <= len(raw):
        assert raw[i] in (0x14, 0x15, 0x16, 0x17), raw[i : i + 5]
        (n,) = struct.unpack(">H", raw[i + 3 : i + 5])
        lengths.append(n)
        i += 5 + n
    return lengths


def test_one_byte_records(env: Env) -> None:
    env.state.one_byte_records = True
    payload = b"hello, one byte at a time"
    with env.client() as c:
        c.handshake()
        assert c.exchange() == (1, "")  # the reply is exempt: still one record
        mark = len(c.raw_in)
        c.send(payload)
        assert c.recv_exactly(len(payload)) == payload
        # A TLS 1.3 record of one byte is 1 + 1 (content type) + 16 (AEAD tag) = 18 bytes.
        assert _record_lengths(bytes(c.raw_in[mark:])) == [18] * len(payload)


def test_flow_control_pauses_and_resumes_without_loss(env: Env) -> None:
    """A client that sends but does not read must stall (the server stops reading once its
    write buffer is full) instead of making the server buffer everything; once the client reads
    again every byte comes back in order."""
    env.wait_until(lambda: env.active() == 0, "earlier tests' connections to be released")
    block = os.urandom(65536)
    with env.client() as c:
        c.handshake()
        assert c.exchange() == (1, "")
        c.sock.setblocking(False)
        pending = b""
        sent = 0
        sent_hash = hashlib.sha256()
        while True:
            if not pending:
                assert sent < 512 * 1024 * 1024, "the server never stopped reading"
                chunk = sent.to_bytes(8, "big") + block
                c.obj.write(chunk)
                sent += len(chunk)
                sent_hash.update(chunk)
                pending = c.out.read()
            try:
                pending = pending[c.sock.send(pending) :]
            except BlockingIOError:
                # Stalled: proving that it stays stalled needs a (short) bounded wait.
                _, writable, _ = select.select([], [c.sock], [], 0.5)
                if not writable:
                    break

        async def probe() -> list[tuple[list[str], int]]:
            return [
                (sorted(conn.read_pauses), conn.transport.get_write_buffer_size())
                for conn in env.server.connections
                if conn.transport is not None
            ]

        [(pauses, buffered)] = asyncio.run_coroutine_threadsafe(probe(), env.loop).result(10)
        assert pauses == ["client write buffer full"]
        assert buffered < 2 * 1024 * 1024

        received = 0
        got_hash = hashlib.sha256()
        while received < sent:
            readable, writable, _ = select.select([c.sock], [c.sock] if pending else [], [], 10)
            assert readable or writable, "no progress"
            if writable:
                pending = pending[c.sock.send(pending) :]
            if readable:
                c._fill()
                while True:
                    try:
                        data = c.obj.read(65536)
                    except ssl.SSLWantReadError:
                        break
                    received += len(data)
                    got_hash.update(data)
        assert received == sent
        assert got_hash.digest() == sent_hash.digest()


def test_half_close_with_close_notify(env: Env) -> None:
    payload = b"x" * 300_000
    with env.client() as c:
        c.handshake()
        assert c.exchange() == (1, "")
        c.send(payload)
        c.close_notify()  # we are done sending; everything must still come back, then EOF
        assert c.recv_to_eof() == payload


def test_half_close_with_tcp_fin(env: Env) -> None:
    with env.client() as c:
        c.handshake()
        assert c.exchange() == (1, "")
        c.send(b"bye")
        c.sock.shutdown(socket.SHUT_WR)  # FIN without close_notify
        assert c.recv_to_eof() == b"bye"


def test_connections_are_counted_and_released(env: Env) -> None:
    env.wait_until(lambda: env.active() == 0, "earlier tests' connections to be released")
    base = 0
    accepted = env.counters()["connections_accepted"]
    with env.client() as c:
        c.handshake()
        assert c.exchange() == (1, "")
        env.wait_until(lambda: env.active() == base + 1, "one active connection")
    env.wait_until(lambda: env.active() == base, "the connection to be released")
    assert env.counters()["connections_accepted"] == accepted + 1


# --- CA rotation ------------------------------------------------------------------------------


def test_ca_rotation(env: Env) -> None:
    old = env.issue(cluster=ROT_CLUSTER)
    old_ctx = env.ctx_for(old)
    with TLSClient(old_ctx, env.rot_addr) as in_flight:
        in_flight.handshake()
        assert in_flight.exchange() == (1, "")
        in_flight.send(b"before")
        assert in_flight.recv_exactly(6) == b"before"

        env.pki.rotate(ROT_CLUSTER)
        new = env.issue(cluster=ROT_CLUSTER)
        assert new.ca_cert_pem != old.ca_cert_pem

        # New handshakes present the new server certificate: a client trusting only the new
        # root succeeds, one trusting only the old root fails to verify the server.
        with TLSClient(env.ctx_for(new), env.rot_addr) as c:
            c.handshake()
            assert c.exchange() == (1, "")
        with TLSClient(old_ctx, env.rot_addr) as c, pytest.raises(ssl.SSLCertVerificationError):
            c.handshake()
        # An old-CA client certificate is refused even by a client that trusts the new root.
        with TLSClient(env.ctx_for(old, trust=new.ca_cert_pem), env.rot_addr) as c:
            expect_refused(c)

        # The connection made before the rotation keeps its context.
        in_flight.send(b"after")
        assert in_flight.recv_exactly(5) == b"after"


def test_certificate_of_another_cluster_is_refused(env: Env) -> None:
    cc = env.issue(cluster=ROT_CLUSTER)
    ctx = env.ctx_for(cc, trust=env.pki.ca_for(CLUSTER).root_pem)
    with TLSClient(ctx, env.addr) as c:
        expect_refused(c)


# --- PostgreSQL backends ----------------------------------------------------------------------


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_startup(sock: socket.socket) -> bytes:
    (n,) = struct.unpack(">I", recv_exactly(sock, 4))
    return struct.pack(">I", n) + recv_exactly(sock, n - 4)


def read_message(sock: socket.socket) -> bytes:
    head = recv_exactly(sock, 5)
    (n,) = struct.unpack(">I", head[1:])
    return head + recv_exactly(sock, n - 4)


def read_to_eof(sock: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := sock.recv(65536):
        buf += chunk
    return bytes(buf)


class FakeBackend:
    """A scripted PostgreSQL stand-in: ``script(sock)`` runs per accepted connection in a thread
    and returns what it wants the test to see."""

    def __init__(self, script: Callable[[socket.socket], object]) -> None:
        self.script = script
        self.lsock = socket.create_server((HOST, 0))
        self.port = self.lsock.getsockname()[1]
        self.results: list[object] = []
        self.errors: list[BaseException] = []
        self.done = threading.Event()
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.lsock.accept()
            except OSError:
                return
            self.accepted += 1
            sock.settimeout(TIMEOUT)
            try:
                with sock:
                    self.results.append(self.script(sock))
            except BaseException as exc:  # surfaced by result()
                self.errors.append(exc)
            self.done.set()

    def result(self) -> object:
        assert self.done.wait(TIMEOUT), "backend script did not finish"
        if self.errors:
            raise self.errors[0]
        return self.results[0]

    def close(self) -> None:
        self.lsock.close()


Script = Callable[[socket.socket], object]
StartBackend = Callable[[Script], FakeBackend]


@pytest.fixture
def backend(env: Env) -> Iterator[StartBackend]:
    """Start a scripted backend and point the emulator's ``external`` backend at it."""
    made: list[FakeBackend] = []

    def start(script: Script) -> FakeBackend:
        fb = FakeBackend(script)
        made.append(fb)
        with env.state.lock:
            env.state.backend = Backend(
                kind="external", host=HOST, port=fb.port, iam_password=IAM_PASSWORD
            )
        return fb

    yield start
    for fb in made:
        fb.close()


def cleartext_login(sock: socket.socket) -> tuple[bytes, bytes, bytes]:
    """Ask for a cleartext password, accept any, then echo until EOF."""
    startup = read_startup(sock)
    sock.sendall(AUTH_CLEARTEXT)
    password = read_message(sock)
    sock.sendall(AUTH_OK + READY)
    rest = read_to_eof(sock)
    sock.sendall(b"bye")
    return startup, password, rest


def test_auto_iam_cleartext_password_is_answered_by_the_emulator(
    env: Env, backend: StartBackend
) -> None:
    fb = backend(cleartext_login)
    with env.client() as c:
        c.handshake()
        c.send(mdx_request("sa-token", auth_type=2) + startup_message(SA_DB_USER))
        assert c.recv_exactly(6) == MDX_OK
        # The client never sees the password request: AuthenticationOk comes first.
        assert c.recv_exactly(len(AUTH_OK + READY)) == AUTH_OK + READY
        c.send(b"Q-query")
        c.close_notify()
        assert c.recv_to_eof() == b"bye"
    result = fb.result()
    assert isinstance(result, tuple)
    startup, password, rest = result
    assert startup == startup_message(SA_DB_USER)
    secret = IAM_PASSWORD.encode() + b"\0"
    assert password == b"p" + struct.pack(">I", 4 + len(secret)) + secret
    assert rest == b"Q-query"


def test_auto_iam_ssl_request_is_refused_then_startup(env: Env, backend: StartBackend) -> None:
    fb = backend(cleartext_login)
    with env.client() as c:
        c.handshake()
        assert c.exchange(token="sa-token", auth_type=2) == (1, "")
        c.send(SSL_REQUEST)
        assert c.recv_exactly(1) == b"N"
        c.send(startup_message(SA_DB_USER))
        assert c.recv_exactly(len(AUTH_OK + READY)) == AUTH_OK + READY
        c.close_notify()
        assert c.recv_to_eof() == b"bye"
    result = fb.result()
    assert isinstance(result, tuple)
    assert result[0] == startup_message(SA_DB_USER)


def test_auto_iam_user_mismatch_gets_28000(env: Env, backend: StartBackend) -> None:
    fb = backend(cleartext_login)
    with env.client() as c:
        c.handshake()
        assert c.exchange(token="sa-token", auth_type=2) == (1, "")
        c.send(startup_message("postgres"))
        fields = pg_fields(c.recv_to_eof())
    assert fields["S"] == "FATAL" and fields["C"] == "28000"
    assert fields["M"].startswith('IAM authentication failed for user "postgres": token belongs')
    assert SA in fields["M"]
    assert fb.accepted == 0  # refused before the backend was even dialled


def test_auto_iam_scram_request_fails_clearly(env: Env, backend: StartBackend) -> None:
    def scram(sock: socket.socket) -> bytes:
        read_startup(sock)
        sock.sendall(b"R" + struct.pack(">II", 23, 10) + b"SCRAM-SHA-256\0\0")
        return read_to_eof(sock)

    fb = backend(scram)
    with env.client() as c:
        c.handshake()
        assert c.exchange(token="sa-token", auth_type=2) == (1, "")
        c.send(startup_message(SA_DB_USER))
        fields = pg_fields(c.recv_to_eof())
    assert fields["C"] == "28000" and "SCRAM" in fields["M"]
    assert fb.result() == b""


def test_auto_iam_cancel_request_is_forwarded_untouched(env: Env, backend: StartBackend) -> None:
    fb = backend(lambda sock: read_to_eof(sock))
    cancel = struct.pack(">IIII", 16, 80877102, 1234, 5678)
    with env.client() as c:
        c.handshake()
        assert c.exchange(token="sa-token", auth_type=2) == (1, "")
        c.send(cancel)
        c.close_notify()
        assert c.recv_to_eof() == b""
    assert fb.result() == cancel


def test_db_native_is_forwarded_untouched(env: Env, backend: StartBackend) -> None:
    def native(sock: socket.socket) -> tuple[bytes, bytes]:
        startup = read_startup(sock)
        sock.sendall(AUTH_CLEARTEXT)
        password = read_message(sock)
        sock.sendall(AUTH_OK + READY)
        read_to_eof(sock)
        return startup, password

    fb = backend(native)
    with env.client() as c:
        c.handshake()
        assert c.exchange(token="sa-token", auth_type=1) == (1, "")
        c.send(startup_message("postgres"))
        assert c.recv_exactly(9) == AUTH_CLEARTEXT  # the client answers it itself
        c.send(b"p\x00\x00\x00\x0bsecret\x00")
        assert c.recv_exactly(len(AUTH_OK + READY)) == AUTH_OK + READY
        c.close_notify()
        assert c.recv_to_eof() == b""
    assert fb.result() == (startup_message("postgres"), b"p\x00\x00\x00\x0bsecret\x00")


def test_backend_half_close_reaches_client_and_client_can_still_send(
    env: Env, backend: StartBackend
) -> None:
    def half(sock: socket.socket) -> bytes:
        assert recv_exactly(sock, 5) == b"hello"
        sock.sendall(b"world")
        sock.shutdown(socket.SHUT_WR)  # backend done sending, still reading
        return read_to_eof(sock)

    fb = backend(half)
    with env.client(mdx=False) as c:
        c.handshake()
        c.send(b"hello")
        assert c.recv_to_eof() == b"world"  # then close_notify
        c.send(b"more after the server's close_notify")
        c.close_notify()
    assert fb.result() == b"more after the server's close_notify"


def test_unreachable_backend_gets_a_postgres_error(env: Env) -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with env.state.lock:
        env.state.backend = Backend(kind="external", host=HOST, port=port)
    with env.client() as c:
        c.handshake()
        assert c.exchange() == (1, "")
        c.send(startup_message("postgres"))
        fields = pg_fields(c.recv_to_eof())
    assert fields["C"] == "08006" and "cannot reach backend" in fields["M"]


# --- scale ------------------------------------------------------------------------------------


def test_500_concurrent_connections(env: Env) -> None:
    ctx = env.ctx()
    n = 500
    env.wait_until(lambda: env.active() == 0, "earlier tests' connections to be released")
    base = 0

    async def one(i: int, opened: list[int], release: asyncio.Event) -> bytes:
        reader, writer = await asyncio.open_connection(
            HOST, env.addr[1], ssl=ctx, server_hostname=HOST
        )
        payload = f"connection {i}".encode()
        writer.write(mdx_request("alice-token") + payload)
        assert await reader.readexactly(6) == MDX_OK
        got = await reader.readexactly(len(payload))
        opened.append(i)
        if len(opened) == n:
            release.set()
        await release.wait()  # all n are open at the same time
        writer.close()
        return got

    async def run() -> list[bytes]:
        release = asyncio.Event()
        opened: list[int] = []
        return await asyncio.gather(*(one(i, opened, release) for i in range(n)))

    results = asyncio.run(run())
    assert results == [f"connection {i}".encode() for i in range(n)]
    env.wait_until(lambda: env.active() == base, "all connections to be released")
