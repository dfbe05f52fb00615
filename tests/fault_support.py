"""Misbehaving peers for the fault tests: a fake AlloyDB instance built on the emulator's PKI, an
Admin API interposer that alters the emulator's certificates, and what both Admin API fakes (the
interposer, test_admin's scripted server) build on: a JSON HTTP server and throwaway certificate
chains.

``FakeInstance`` listens on 127.0.0.1 and runs a test-supplied behaviour for every accepted
connection on its own thread: reset in the middle of the TLS handshake, answer the metadata
exchange with garbage, never answer, speak TLS 1.2 only, present a certificate for another
address. The proxy dials it with a :class:`~fastproxy.source.DialInfo` made from a client
certificate the same (in-process) emulator PKI signed, so everything but the misbehaviour is what
the real emulator does.

Every wait is bounded; every socket is closed when the server stops.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fastproxy.emulator.dataplane import _load_cert_chain_in_memory, server_ssl_context
from fastproxy.emulator.mdxcodec import ResponseCode, encode_response
from fastproxy.emulator.pki import PKI
from fastproxy.emulator.state import Instance, InstanceName
from fastproxy.keys import generate_key, public_key_pem
from fastproxy.mdx import AuthType
from fastproxy.source import DialInfo, next_generation
from fastproxy.tlsctx import build_client_context
from tests.e2e_support import DEMO_URI, recv_exactly
from tests.inproc_support import WAIT_S, self_signed_ca

FAKE_TOKEN = "fake-instance-token"


@functools.cache
def client_key() -> rsa.RSAPrivateKey:
    """One RSA-2048 client key for the whole session (generation costs tens of ms)."""
    return generate_key()


@functools.cache
def _pki() -> PKI:
    return PKI()


def _instance(san_ip: str) -> Instance:
    # One instance name per address (the PKI caches server credentials per instance), all in the
    # demo cluster, so one client certificate is good for each of them.
    name = InstanceName.parse(DEMO_URI.rsplit("/", 1)[0] + "/fake-" + san_ip.replace(".", "-"))
    return Instance(name, f"uid-{san_ip}", san_ip, None, None)


def server_context(san_ip: str = "127.0.0.1", *, tls12_only: bool = False) -> ssl.SSLContext:
    """The emulator's server-side context for an instance whose certificate names ``san_ip``."""
    creds = _pki().server_credentials(_instance(san_ip))
    if not tls12_only:
        return server_ssl_context(creds)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=creds.client_ca_pem.decode("ascii"))
    _load_cert_chain_in_memory(ctx, creds.cert_chain_pem, creds.key_pem)
    return ctx


def fake_dial_info(port: int, *, name: str = "fake.instance") -> DialInfo:
    """What the proxy needs to dial a :class:`FakeInstance` on 127.0.0.1:``port``."""
    key = client_key()
    cert = _pki().sign_client_certificate(
        _instance("127.0.0.1").name.cluster_parent,
        public_key_pem(key),
        3600,
        True,
        "fault-tests@example.com",
    )
    return DialInfo(
        instance=name,
        context=build_client_context(cert.chain_pems, key, cert.ca_cert_pem),
        generation=next_generation(),
        expires_at=cert.not_after,
        address="127.0.0.1",
        port=port,
        metadata_exchange=True,
        auth_type=AuthType.DB_NATIVE,
        exchange_token=FAKE_TOKEN,
        user_agent="fastproxy-fault-tests",
    )


# --- the fake instance ------------------------------------------------------------------------


@dataclass
class Peer:
    """One connection accepted by the fake instance, as its behaviour sees it."""

    sock: socket.socket
    server: FakeInstance
    #: monotonic time at which the proxy's side of this connection was seen closed (EOF or reset)
    closed_at: float | None = None
    notes: list[str] = field(default_factory=list)
    #: plaintext (or raw bytes) read while waiting for the proxy to close
    received: bytearray = field(default_factory=bytearray)

    def tls(self, ctx: ssl.SSLContext | None = None) -> ssl.SSLSocket:
        """Complete the server side of the TLS handshake (the emulator's context by default)."""
        tls = (ctx or self.server.context).wrap_socket(self.sock, server_side=True)
        self.sock = tls
        return tls

    def read_exchange_request(self) -> bytes:
        """The proxy's framed metadata exchange request (prefix and body)."""
        head = recv_exactly(self.sock, 4)
        (size,) = struct.unpack(">I", head)
        return head + recv_exactly(self.sock, size)

    def answer_ok(self, trailer: bytes = b"") -> None:
        self.sock.sendall(encode_response(ResponseCode.OK) + trailer)

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0), not a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def wait_closed_by_proxy(self, timeout: float = WAIT_S) -> float:
        """Read until the proxy closes its side (EOF, close_notify or reset), then close ours, as
        a server does; returns when the proxy's close was seen."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except (ConnectionError, ssl.SSLError, OSError):
                break
            if not data:
                break
            self.received += data
        else:
            raise AssertionError("the proxy never closed the upstream connection")
        self.closed_at = time.monotonic()
        with contextlib.suppress(OSError, ValueError):
            if isinstance(self.sock, ssl.SSLSocket):
                self.sock.settimeout(1.0)
                self.sock = self.sock.unwrap()  # our close_notify, as a well-behaved server
        with contextlib.suppress(OSError):
            self.sock.close()
        return self.closed_at


Behaviour = Callable[[Peer], None]


class FakeInstance:
    """A TCP server on 127.0.0.1 that runs ``behaviour`` for every accepted connection."""

    def __init__(self, behaviour: Behaviour, *, context: ssl.SSLContext | None = None) -> None:
        self.behaviour = behaviour
        self.context = context or server_context()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = int(self.listener.getsockname()[1])
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []
        #: set by the test to let a behaviour that waits for it go on
        self.release = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="fake-instance", daemon=True)
        self._acceptor.start()

    def dial_info(self, name: str = "fake.instance") -> DialInfo:
        return fake_dial_info(self.port, name=name)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(WAIT_S)
            peer = Peer(sock, self)
            self.peers.append(peer)
            t = threading.Thread(target=self._serve, args=(peer,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, peer: Peer) -> None:
        try:
            self.behaviour(peer)
        except BaseException as exc:  # reported to the test through .errors
            self.errors.append(exc)

    def wait_peers(self, n: int, timeout: float = WAIT_S) -> list[Peer]:
        deadline = time.monotonic() + timeout
        while len(self.peers) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"the fake instance saw {len(self.peers)} of {n} dials")
            time.sleep(0.01)
        return self.peers[:n]

    def join(self, timeout: float = WAIT_S) -> None:
        """Wait for every behaviour to finish."""
        for t in list(self._threads):
            t.join(timeout)
            assert not t.is_alive(), "a fake-instance behaviour did not finish"

    def close(self) -> None:
        self._stop.set()
        self.release.set()
        self.listener.close()
        self._acceptor.join(timeout=5)
        for t in list(self._threads):
            t.join(timeout=5)
        for peer in self.peers:
            with contextlib.suppress(OSError):
                peer.sock.close()

    def __enter__(self) -> FakeInstance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the Admin API interposer ----------------------------------------------------------------


def _stranger_public_pem() -> str:
    return public_key_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def chain_for(public: rsa.RSAPublicKey, not_after: dt.datetime) -> tuple[list[str], str]:
    """A client leaf for ``public`` valid for the two hours up to ``not_after``, signed by a
    throwaway root: ``([leaf, root], root)`` as PEM, the shape of an Admin API answer."""
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = self_signed_ca(ca_key, "root", dt.datetime.now(dt.UTC) - dt.timedelta(days=1), serial=1)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "client")]))
        .issuer_name(root.subject)
        .public_key(public)
        .serial_number(2)
        .not_valid_before(not_after - dt.timedelta(hours=2))
        .not_valid_after(not_after)
        .sign(ca_key, hashes.SHA256())
    )
    pems = [c.public_bytes(serialization.Encoding.PEM).decode() for c in (leaf, root)]
    return pems, pems[1]


#: Gets the request (method, path, headers) and its body (None when empty); gives the status
#: and the JSON bytes to answer with.
Answer = Callable[[BaseHTTPRequestHandler, bytes | None], tuple[int, bytes]]


@contextlib.contextmanager
def json_http_server(answer: Answer) -> Iterator[str]:
    """An HTTP/1.1 server on 127.0.0.1 answering every GET and POST with what ``answer`` gives,
    as ``application/json``, on its own threads. Yields its endpoint."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            status, raw = answer(self, self.rfile.read(length) if length else None)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def admin_interposer(upstream: str, mode: str) -> Iterator[str]:
    """An HTTP server forwarding Admin API calls to ``upstream`` (the emulator), altering
    ``generateClientCertificate``: ``wrong-key`` asks the emulator for a certificate for another
    public key (a real certificate, for the wrong key); ``expired`` answers with a certificate for
    the right key that has already expired. Yields the interposer's endpoint."""
    assert mode in ("wrong-key", "expired")
    stranger = _stranger_public_pem() if mode == "wrong-key" else ""

    def forward(handler: BaseHTTPRequestHandler, body: bytes | None) -> tuple[int, bytes]:
        is_cert = handler.path.endswith(":generateClientCertificate")
        request: dict[str, Any] = json.loads(body) if (is_cert and body) else {}
        if is_cert and mode == "wrong-key":
            request["publicKey"] = stranger
            body = json.dumps(request).encode()
        headers = {
            k: v
            for k, v in handler.headers.items()
            if k.lower() in ("authorization", "content-type", "x-goog-request-params")
        }
        resp = requests.request(
            handler.command, upstream + handler.path, data=body, headers=headers, timeout=30
        )
        if is_cert and mode == "expired" and resp.status_code == 200:
            public = serialization.load_pem_public_key(str(request["publicKey"]).encode())
            assert isinstance(public, rsa.RSAPublicKey)
            chain, ca = chain_for(public, dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
            answer = resp.json()
            answer["pemCertificateChain"] = chain
            answer["caCert"] = ca
            return resp.status_code, json.dumps(answer).encode()
        return resp.status_code, resp.content

    with json_http_server(forward) as endpoint:
        yield endpoint
