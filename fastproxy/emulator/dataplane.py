"""The emulator's server side: what a client finds on ``<instance ip>:5433``.

Per connection (protocol.md §3, §4, §7.3 items 7-10):

1. **TLS 1.3 with a required client certificate**, verified against the instance's cluster root
   only (the cluster's client CA comes from the chain the client presents).
2. **Issued-certificate check**: the leaf's serial must be one this emulator signed, for this
   cluster. Whether a metadata exchange follows is what was requested when the certificate was
   issued (``useMetadataExchange``), not a guess from the first bytes (§4.6 option a).
3. **Metadata exchange** (only if so requested): one framed request within 30 s, one framed reply
   written as a single TLS record.
4. **Forwarding** to the backend: ``echo``, or TCP to a PostgreSQL with both half-closes
   propagated. For AUTO_IAM logins the StartupMessage ``user`` is checked against the token's
   principal and the backend's cleartext password request is answered by the emulator.

Design choices, and why:

* **TLS is done here, on memory BIOs, over a plain asyncio TCP transport** (``ssl.SSLObject``),
  not with ``create_server(ssl=...)``. Three requirements rule out asyncio's SSL transport: TLS
  half-close (asyncio answers a client's close_notify by shutting the whole TLS session down, so a
  backend's last reply could be lost), one TLS record per relayed byte (the ``one_byte_records``
  fault needs control of record boundaries), and choosing the TLS context per accepted socket.
  Because TLS starts with the very first byte there is no ``start_tls`` hand-over that could lose
  bytes (§10), and every ciphertext byte the client sends goes into one incoming BIO in order.
* **CA rotation**: contexts are built per (instance, CA generation). Each accepted connection asks
  ``PKI.generation`` (cheap) and takes the context of the current generation, building it in the
  default executor when it is new (RSA key generation must not stall ten thousand connections).
  A context is never mutated once built; connections in flight keep the one they started with.
* **Flow control**: each direction stops reading its source while the destination transport's
  write buffer is above its high-water mark (asyncio ``pause_writing``/``resume_writing``), so a
  slow reader never makes the emulator buffer unboundedly. Plaintext is always drained from the
  TLS object completely; pausing happens at the socket.
* **No thread per connection**: one asyncio loop holds all connections; per-connection state is a
  handful of attributes plus OpenSSL's (buffer-releasing) SSL object.

Byte copies per relayed byte (client→backend): kernel→``bytes`` (asyncio recv), BIO write,
OpenSSL decrypt into a fresh ``bytes``, transport write. That is plenty for a test emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import os
import ssl
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from fastproxy.emulator.mdxcodec import (
    LENGTH_PREFIX_SIZE,
    AuthType,
    MDXDecodeError,
    ResponseCode,
    decode_request,
    encode_response,
    request_length,
)
from fastproxy.emulator.pki import PKI, ServerCredentials, serial_of_der
from fastproxy.emulator.state import EmulatorState, Instance, IssuedCert, iam_db_user

log = logging.getLogger("fastproxy.emulator.server")

DEFAULT_PORT = 5433  # every AlloyDB client dials this port (§2.7)
# Clients give the exchange 30 s (§4.2, §5.1); the server gives the request as long.
MDX_TIMEOUT_S = 30.0
# A client that connects but never finishes the handshake must not hold a socket forever. Generous
# on purpose: when thousands of connections open at once the clients' own handshake CPU queues
# them for tens of seconds, and the emulator must never be the reason a load test fails.
HANDSHAKE_TIMEOUT_S = 120.0
BACKEND_CONNECT_TIMEOUT_S = 10.0
# After a refusal the server sends its answer, close_notify and FIN, then waits this long for the
# client's EOF before closing: closing with unread input makes the kernel send RST, which can
# destroy the refusal before the client has read it.
LINGER_S = 5.0
# Longest error text put in an exchange reply.
MAX_ERROR_TEXT = 1024
# Plaintext read size per SSLObject.read call (bounded by the TLS record size anyway).
READ_CHUNK = 64 * 1024
# Write-buffer watermarks of both transports: above HIGH the other side stops being read.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
# The listen backlog: the scale tests open thousands of connections at once.
LISTEN_BACKLOG = 4096

# PostgreSQL wire protocol (frontend/backend protocol docs).
PG_PROTOCOL_3 = 3
PG_SSL_REQUEST = 80877103
PG_GSSENC_REQUEST = 80877104
PG_CANCEL_REQUEST = 80877102
PG_MAX_STARTUP_PACKET = 10000  # PostgreSQL's MAX_STARTUP_PACKET_LENGTH
PG_AUTH_OK = 0
PG_AUTH_CLEARTEXT = 3
# Messages a backend sends before authentication completes are small; a huge one is not Postgres.
PG_MAX_AUTH_MESSAGE = 64 * 1024
_PG_AUTH_NAMES = {
    2: "KerberosV5",
    5: "MD5 password",
    7: "GSSAPI",
    9: "SSPI",
    10: "SASL (SCRAM)",
}
_INT32 = struct.Struct(">i")
_UINT32 = struct.Struct(">I")

_BACKEND_KINDS_TCP = ("postgres", "external")


# --- TLS context --------------------------------------------------------------------------------
def server_ssl_context(creds: ServerCredentials) -> ssl.SSLContext:
    """A fresh server context for one instance and CA generation.

    TLS 1.3 only; client certificate required and verified against the cluster root alone
    (the client sends its intermediate); strict X.509 checks; OpenSSL's default purpose check
    for a server verifying a client requires EKU clientAuth when the extension is present.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=creds.client_ca_pem.decode("ascii"))
    _load_cert_chain_in_memory(ctx, creds.cert_chain_pem, creds.key_pem)
    return ctx


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _load_cert_chain_in_memory(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """``load_cert_chain`` only takes file names; the server key must never touch a disk.

    On Linux an anonymous ``memfd`` is read through ``/proc/self/fd``. Elsewhere a private
    temporary directory is used and removed immediately.
    """
    blob = chain_pem.rstrip(b"\n") + b"\n" + key_pem
    memfd_create: Callable[..., int] | None = getattr(os, "memfd_create", None)
    if memfd_create is not None and Path("/proc/self/fd").is_dir():
        fd = memfd_create("fastproxy-emulator-server-credentials", os.MFD_CLOEXEC)
        try:
            _write_all(fd, blob)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="fastproxy-emulator-") as tmp:
        path = Path(tmp) / "server.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, blob)
        finally:
            os.close(fd)
        ctx.load_cert_chain(str(path))


# --- PostgreSQL helpers -------------------------------------------------------------------------
def pg_error_response(sqlstate: str, message: str, severity: str = "FATAL") -> bytes:
    """A PostgreSQL ErrorResponse ('E') with severity, SQLSTATE and message."""
    fields = b""
    for code, value in ((b"S", severity), (b"V", severity), (b"C", sqlstate), (b"M", message)):
        fields += code + value.encode("utf-8", "replace").replace(b"\0", b"?") + b"\0"
    fields += b"\0"
    return b"E" + _UINT32.pack(len(fields) + 4) + fields


def pg_password_message(password: str) -> bytes:
    """A PasswordMessage ('p') carrying ``password`` in cleartext."""
    payload = password.encode("utf-8") + b"\0"
    return b"p" + _UINT32.pack(len(payload) + 4) + payload


def parse_startup_parameters(body: bytes) -> dict[str, str]:
    """Parse the NUL-separated key/value pairs after the protocol version of a StartupMessage.

    Raises ``ValueError`` if the list is not terminated properly.
    """
    params: dict[str, str] = {}
    parts = body.split(b"\0")
    # A well-formed list is k1 \0 v1 \0 ... kn \0 vn \0 \0 → split ends with ["", ""].
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
        raise ValueError("startup parameters are not NUL-terminated")
    items = parts[:-2]
    if len(items) % 2:
        raise ValueError("startup parameter without a value")
    for i in range(0, len(items), 2):
        key = items[i].decode("utf-8", "replace")
        if not key:
            raise ValueError("empty startup parameter name")
        params[key] = items[i + 1].decode("utf-8", "replace")
    return params


# --- one connection -----------------------------------------------------------------------------
class _Phase(enum.Enum):
    CREDENTIALS = "waiting for server credentials"
    HANDSHAKE = "TLS handshake"
    EXCHANGE = "metadata exchange"
    STARTUP = "PostgreSQL startup"
    CONNECTING = "connecting to backend"
    RELAY = "relay"
    LINGER = "closing after refusal"
    CLOSED = "closed"


class _BackendProtocol(asyncio.Protocol):
    """The TCP connection to the backend; everything is delegated to the client connection."""

    def __init__(self, conn: ServerConnection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        self.conn.from_backend(data)

    def eof_received(self) -> bool:
        self.conn.backend_eof()
        return True  # keep our write side open: the client may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.backend_lost(exc)

    def pause_writing(self) -> None:
        self.conn.pause_client_reading("backend write buffer full")

    def resume_writing(self) -> None:
        self.conn.resume_client_reading("backend write buffer full")


class ServerConnection(asyncio.Protocol):
    """One client connection to one instance: TLS, exchange, forwarding, one close path.

    All methods run on the loop thread. ``_close`` is the only place that ends a connection;
    ``connection_lost`` writes the single close log line.
    """

    def __init__(self, server: ServerSide, instance: Instance) -> None:
        self.server = server
        self.state = server.state
        self.instance = instance
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.phase = _Phase.CREDENTIALS
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj: ssl.SSLObject | None = None
        self.pending_cipher: list[bytes] = []  # ciphertext that arrived before the context
        self.inbuf = bytearray()  # client plaintext not yet consumed (exchange/startup/connect)
        self.issued: IssuedCert | None = None
        self.principal: str | None = None
        self.auth_type: int | None = None  # None: no exchange happened
        self.echo = False
        self.backend: _BackendProtocol | None = None
        self.backend_task: asyncio.Task[None] | None = None
        self.backend_buf = bytearray()  # backend bytes parsed while intercepting IAM auth
        self.iam_intercept = False
        self.client_done = False  # the client finished sending (close_notify or FIN)
        self.server_done = False  # we sent close_notify: nothing more goes to the client
        self.fin_sent = False  # we half-closed the client's TCP connection
        self.backend_done = False  # the backend finished sending
        self.read_pauses: set[str] = set()
        self.timer: asyncio.TimerHandle | None = None
        self.reason = "client disconnected"
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self.bytes_from_backend = 0
        self.bytes_to_backend = 0

    # --- asyncio.Protocol (client side) ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
        with self.state.lock:
            self.state.counters.connections_accepted += 1
            self.state.counters.connections_active += 1
        self.server.connections.add(self)
        self._arm_timer(
            HANDSHAKE_TIMEOUT_S, f"TLS handshake not finished within {HANDSHAKE_TIMEOUT_S:.0f} s"
        )
        ctx = self.server.context_for(self.instance)
        if isinstance(ctx, ssl.SSLContext):
            self._start_tls(ctx)
        else:
            ctx.add_done_callback(self._context_ready)

    def data_received(self, data: bytes) -> None:
        if self.phase in (_Phase.CLOSED, _Phase.LINGER):
            return  # after a refusal the client's input is discarded
        if self.phase is _Phase.CREDENTIALS:
            self.pending_cipher.append(data)
            return
        self.incoming.write(data)
        self._pump()

    def eof_received(self) -> bool:
        if self.phase in (_Phase.CREDENTIALS, _Phase.HANDSHAKE):
            self._handshake_failed(
                "client closed the connection during the TLS handshake", client_gone=True
            )
            return False
        if self.phase is _Phase.LINGER:
            self._close(self.reason)  # the refusal's reason, already logged at INFO
            return False
        if not self.client_done:
            # TCP EOF without close_notify: a truncation by TLS rules, but treated as the end of
            # the client's data (what the relay needs) and logged as such.
            self._client_eof("client sent FIN without close_notify")
        return True  # keep our write side open until the backend has finished too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase is not _Phase.CLOSED:
            self.reason = f"client connection lost ({exc})" if exc else "client disconnected"
            self._close(self.reason)
        with self.state.lock:
            self.state.counters.connections_active -= 1
        self.server.connections.discard(self)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "connection closed: peer=%s instance=%s reason=%s client_in=%d client_out=%d "
                "backend_in=%d backend_out=%d",
                self.peer,
                self.instance.name.short,
                self.reason,
                self.bytes_from_client,
                self.bytes_to_client,
                self.bytes_from_backend,
                self.bytes_to_backend,
            )

    def pause_writing(self) -> None:
        # The client is not reading fast enough: stop producing data for it.
        if self.echo:
            self.pause_client_reading("client write buffer full")
        elif self.backend is not None and self.backend.transport is not None:
            self.backend.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.echo:
            self.resume_client_reading("client write buffer full")
        elif self.backend is not None and self.backend.transport is not None:
            self.backend.transport.resume_reading()

    # --- TLS -------------------------------------------------------------------------------------
    def _context_ready(self, fut: asyncio.Future[ssl.SSLContext]) -> None:
        if self.phase is not _Phase.CREDENTIALS:
            return
        if fut.cancelled() or fut.exception() is not None:
            self._handshake_failed(f"no server credentials: {fut.exception()!r}")
            return
        self._start_tls(fut.result())

    def _start_tls(self, ctx: ssl.SSLContext) -> None:
        self.sslobj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.phase = _Phase.HANDSHAKE
        for chunk in self.pending_cipher:
            self.incoming.write(chunk)
        self.pending_cipher.clear()
        if self.incoming.pending:
            self._pump()

    def _flush(self) -> None:
        """Send whatever OpenSSL produced (handshake, records, alerts)."""
        if not self.outgoing.pending:
            return
        data = self.outgoing.read()
        # After our FIN nothing can be sent (e.g. a reply to a late KeyUpdate): drop it.
        if self.transport is not None and not self.transport.is_closing() and not self.fin_sent:
            self.transport.write(data)

    def _write_eof(self) -> None:
        """TCP half-close towards the client, after whatever is queued."""
        if self.fin_sent or self.transport is None or self.transport.is_closing():
            return
        if self.transport.can_write_eof():
            self.fin_sent = True
            self.transport.write_eof()

    def _pump(self) -> None:
        assert self.sslobj is not None
        if self.phase is _Phase.HANDSHAKE:
            try:
                self.sslobj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except (ssl.SSLError, ValueError) as exc:
                self._handshake_failed(f"TLS handshake failed: {_describe_ssl_error(exc)}")
                return
            self._flush()
            self._cancel_timer()
            self._handshake_done()
        self._read_plaintext()

    def _read_plaintext(self) -> None:
        """Drain every complete record: data that came with the Finished or with the exchange
        request is still in the BIO and must not be left behind."""
        assert self.sslobj is not None
        while self.phase not in (_Phase.CLOSED, _Phase.LINGER) and not self.client_done:
            try:
                data = self.sslobj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._client_eof("client sent close_notify")
                break
            except ssl.SSLError as exc:
                self._flush()  # an alert, if OpenSSL produced one
                self._close(f"TLS error from client: {_describe_ssl_error(exc)}", abort=True)
                return
            if not data:
                self._client_eof("client sent close_notify")
                break
            self.bytes_from_client += len(data)
            self._client_plaintext(data)
        self._flush()

    def _handshake_failed(self, reason: str, client_gone: bool = False) -> None:
        with self.state.lock:
            self.state.counters.handshakes_failed += 1
        log.info("refused %s at %s: %s", self.peer, self.instance.name.short, reason)
        if client_gone:
            self._close(reason)
            return
        # Counted before the alert goes out: whoever sees the alert sees the counter too. Then
        # linger: in TLS 1.3 the client may already be sending, and closing with unread input
        # would turn the alert into a reset.
        self._linger(reason, close_notify=False)

    # --- after the handshake ---------------------------------------------------------------------
    def _handshake_done(self) -> None:
        assert self.sslobj is not None
        der = self.sslobj.getpeercert(binary_form=True)
        if der is None:  # cannot happen with CERT_REQUIRED; checked rather than assumed
            self._refuse("no client certificate")
            return
        serial = serial_of_der(der)
        issued = self.state.lookup_issued(serial)
        cluster = self.instance.name.cluster_parent
        if issued is None:
            self._refuse(f"client certificate serial {serial:#x} was not issued by this emulator")
            return
        if issued.cluster_parent != cluster:
            self._refuse(
                f"client certificate serial {serial:#x} was issued for {issued.cluster_parent}, "
                f"not {cluster}"
            )
            return
        self.issued = issued
        with self.state.lock:
            drop = self.state.drop_after_handshake
        if drop:
            log.info("dropping %s after the handshake (fault drop_after_handshake)", self.peer)
            self._close("fault: drop_after_handshake")
            return
        if issued.use_metadata_exchange:
            self.phase = _Phase.EXCHANGE
            self._arm_timer(
                MDX_TIMEOUT_S, f"no metadata exchange request within {MDX_TIMEOUT_S:g} s"
            )
        else:
            self._begin_forwarding()

    def _client_plaintext(self, data: bytes) -> None:
        if self.phase is _Phase.RELAY:
            self._to_backend(data)
            return
        self.inbuf += data
        if self.phase is _Phase.EXCHANGE:
            self._try_exchange()
        elif self.phase is _Phase.STARTUP:
            self._try_startup()
        elif self.phase is _Phase.CONNECTING and len(self.inbuf) > WRITE_HIGH_WATER:
            self.pause_client_reading("backend not connected yet")

    def _try_exchange(self) -> None:
        if len(self.inbuf) < LENGTH_PREFIX_SIZE:
            return
        try:
            size = request_length(self.inbuf[:LENGTH_PREFIX_SIZE])
        except MDXDecodeError as exc:
            self._mdx_refuse(str(exc))
            return
        end = LENGTH_PREFIX_SIZE + size
        if len(self.inbuf) < end:
            return
        body = bytes(self.inbuf[LENGTH_PREFIX_SIZE:end])
        del self.inbuf[:end]
        self._cancel_timer()
        try:
            req = decode_request(body)
        except MDXDecodeError as exc:
            self._mdx_refuse(f"malformed metadata exchange request: {exc}")
            return
        if not req.oauth2_token:
            self._mdx_refuse("metadata exchange request carries no OAuth2 token")
            return
        principal = self.state.principal_for(req.oauth2_token)
        if principal is None:
            self._mdx_refuse("OAuth2 token in the metadata exchange is not valid")
            return
        if req.auth_type not in (AuthType.UNSPECIFIED, AuthType.DB_NATIVE, AuthType.AUTO_IAM):
            self._mdx_refuse(f"unsupported auth_type {req.auth_type}")
            return
        cluster = self.instance.name.cluster_parent
        if self.state.is_forbidden(principal, cluster):
            self._mdx_refuse(
                f"{principal} lacks permission alloydb.instances.connect on {cluster}"
            )
            return
        with self.state.lock:
            refusal = self.state.mdx_refusal
            if refusal is None:
                self.state.counters.mdx_ok += 1
        if refusal is not None:
            self._mdx_refuse(refusal, fault=True)
            return
        self.principal = principal
        self.auth_type = req.auth_type
        # Prefix and body in one write, hence one TLS record (§4.2).
        self._send_to_client(encode_response(ResponseCode.OK), relay=False)
        self._begin_forwarding()

    def _mdx_refuse(self, message: str, fault: bool = False) -> None:
        with self.state.lock:
            self.state.counters.mdx_refused += 1
        log.info(
            "metadata exchange refused for %s at %s: %s%s",
            self.peer,
            self.instance.name.short,
            message,
            " (fault mdx_refusal)" if fault else "",
        )
        # Keep the reply far below Go's 16 KiB read buffer (§4.2), whatever the fault text is.
        text = message if len(message) <= MAX_ERROR_TEXT else message[: MAX_ERROR_TEXT - 3] + "..."
        self._send_to_client(encode_response(ResponseCode.ERROR, text), relay=False)
        self._linger(f"metadata exchange refused: {message}")

    def _begin_forwarding(self) -> None:
        with self.state.lock:
            backend = self.state.backend
            kind, host, port = backend.kind, backend.host, backend.port
        if kind == "echo":
            self.echo = True
            self.phase = _Phase.RELAY
            if self.inbuf:
                data = bytes(self.inbuf)
                self.inbuf.clear()
                self._to_backend(data)
            if self.client_done:
                self._finish_to_client()
            return
        if kind not in _BACKEND_KINDS_TCP or host is None or port is None:
            self._refuse(f"backend {kind!r} is not usable (host={host!r}, port={port!r})")
            return
        if self.auth_type == AuthType.AUTO_IAM:
            self.phase = _Phase.STARTUP
            self._try_startup()
        else:
            self._connect_backend(host, port, intercept=False)

    # --- AUTO_IAM StartupMessage -----------------------------------------------------------------
    def _try_startup(self) -> None:
        while self.phase is _Phase.STARTUP and len(self.inbuf) >= 4:
            (length,) = _INT32.unpack_from(self.inbuf, 0)
            if not 8 <= length <= PG_MAX_STARTUP_PACKET:
                self._pg_fatal("08P01", f"invalid startup packet length {length}")
                return
            if len(self.inbuf) < length:
                return
            (code,) = _INT32.unpack_from(self.inbuf, 4)
            if code in (PG_SSL_REQUEST, PG_GSSENC_REQUEST) and length == 8:
                # The stream is already TLS: refuse the upgrade, the StartupMessage comes next.
                del self.inbuf[:8]
                self._send_to_client(b"N", relay=True)
                continue
            if code == PG_CANCEL_REQUEST and length == 16:
                self._connect_with_settings(intercept=False)  # forwarded untouched
                return
            if code >> 16 != PG_PROTOCOL_3:
                self._pg_fatal(
                    "08P01",
                    f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                    "the emulator supports 3.x",
                )
                return
            try:
                params = parse_startup_parameters(bytes(self.inbuf[8:length]))
            except ValueError as exc:
                self._pg_fatal("08P01", f"invalid startup packet: {exc}")
                return
            user = params.get("user", "")
            assert self.principal is not None
            expected = iam_db_user(self.principal)
            if user != expected:
                self._pg_fatal(
                    "28000",
                    f'IAM authentication failed for user "{user}": token belongs to '
                    f'"{self.principal}" (database user "{expected}")',
                )
                return
            self._connect_with_settings(intercept=True)
            return

    def _connect_with_settings(self, intercept: bool) -> None:
        with self.state.lock:
            host, port = self.state.backend.host, self.state.backend.port
        assert host is not None and port is not None
        self._connect_backend(host, port, intercept=intercept)

    def _pg_fatal(self, sqlstate: str, message: str) -> None:
        log.info(
            "PostgreSQL login refused for %s at %s: %s (SQLSTATE %s)",
            self.peer,
            self.instance.name.short,
            message,
            sqlstate,
        )
        self._send_to_client(pg_error_response(sqlstate, message), relay=False)
        self._linger(f"PostgreSQL login refused: {message}")

    # --- backend ---------------------------------------------------------------------------------
    def _connect_backend(self, host: str, port: int, intercept: bool) -> None:
        self.phase = _Phase.CONNECTING
        self.iam_intercept = intercept
        self.backend_task = asyncio.get_running_loop().create_task(
            self._run_connect(host, port)
        )
        self.server.tasks.add(self.backend_task)
        self.backend_task.add_done_callback(self.server.tasks.discard)

    async def _run_connect(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _BackendProtocol(self), host, port),
                BACKEND_CONNECT_TIMEOUT_S,
            )
        except (TimeoutError, OSError) as exc:
            if self.phase is not _Phase.CONNECTING:
                return
            # Whatever the auth mode, the client's next step is the PostgreSQL startup, so a
            # PostgreSQL error is what it can report best.
            self._pg_fatal("08006", f"cannot reach backend {host}:{port}: {exc or 'timeout'}")
            return
        if self.phase is not _Phase.CONNECTING:
            if proto.transport is not None:
                proto.transport.close()
            return
        self.backend = proto
        self.phase = _Phase.RELAY
        if self.inbuf:
            data = bytes(self.inbuf)
            self.inbuf.clear()
            self._to_backend(data)
        self.resume_client_reading("backend not connected yet")
        if self.client_done and proto.transport is not None and proto.transport.can_write_eof():
            proto.transport.write_eof()

    def _to_backend(self, data: bytes) -> None:
        """Client plaintext in RELAY: to the backend, or straight back for ``echo``."""
        if self.echo:
            self.bytes_from_backend += len(data)
            self.bytes_to_backend += len(data)
            self._send_to_client(data, relay=True)
            return
        assert self.backend is not None
        t = self.backend.transport
        if t is None or t.is_closing():
            return  # the backend is gone; its close path ends the connection
        self.bytes_to_backend += len(data)
        t.write(data)

    def from_backend(self, data: bytes) -> None:
        if self.phase is _Phase.CLOSED:
            return
        self.bytes_from_backend += len(data)
        if not self.iam_intercept:
            self._send_to_client(data, relay=True)
            return
        self.backend_buf += data
        self._intercept_auth()

    def _intercept_auth(self) -> None:
        """Answer the backend's cleartext password request for an AUTO_IAM login.

        Messages are forwarded one by one until authentication ends (AuthenticationOk or an
        ErrorResponse); from then on the rest goes through untouched.
        """
        buf = self.backend_buf
        while self.iam_intercept and len(buf) >= 5:
            kind = buf[0]
            (length,) = _INT32.unpack_from(buf, 1)
            if not 4 <= length <= PG_MAX_AUTH_MESSAGE:
                self._pg_fatal("08P01", f"backend sent an invalid message (length {length})")
                return
            if len(buf) < 1 + length:
                return
            msg = bytes(buf[: 1 + length])
            del buf[: 1 + length]
            if kind == ord("R") and length >= 8:
                (code,) = _INT32.unpack_from(msg, 5)
                if code == PG_AUTH_CLEARTEXT:
                    self._answer_password()
                    if self.phase is not _Phase.RELAY:
                        return  # refused: no password to answer with
                    continue
                if code == PG_AUTH_OK:
                    self.iam_intercept = False
                else:
                    method = _PG_AUTH_NAMES.get(code, f"method {code}")
                    self._pg_fatal(
                        "28000",
                        f"IAM authentication failed: the backend asked for {method}, but the "
                        "emulator can only answer a cleartext password request for IAM "
                        "database users",
                    )
                    return
            elif kind == ord("E"):
                self.iam_intercept = False
            self._send_to_client(msg, relay=True)
        if not self.iam_intercept and buf:
            rest = bytes(buf)
            buf.clear()
            self._send_to_client(rest, relay=True)

    def _answer_password(self) -> None:
        with self.state.lock:
            password = self.state.backend.iam_password
        if password is None:
            self._pg_fatal(
                "28000",
                "IAM authentication failed: the backend asked for a password and the emulator "
                "has no IAM password configured for it",
            )
            return
        assert self.backend is not None and self.backend.transport is not None
        self.backend.transport.write(pg_password_message(password))

    def backend_eof(self) -> None:
        self.backend_done = True
        if self.backend_buf and self.phase is not _Phase.CLOSED:
            # A partial message at EOF: forward it as-is; the client will report the truncation.
            rest = bytes(self.backend_buf)
            self.backend_buf.clear()
            self.iam_intercept = False
            self._send_to_client(rest, relay=True)
        self._finish_to_client()

    def backend_lost(self, exc: Exception | None) -> None:
        if self.phase is _Phase.CLOSED:
            return
        if exc is not None and not self.backend_done:
            self._close(f"backend connection lost ({exc})", abort=True)
            return
        if not self.backend_done:
            self.backend_eof()
        if self.phase is _Phase.RELAY and not self.client_done:
            # Nobody is left to take the client's data: give it LINGER_S to close.
            self._arm_timer(LINGER_S, "client did not close after the backend finished")

    # --- sending to the client, half-close -------------------------------------------------------
    def _send_to_client(self, data: bytes, relay: bool) -> None:
        """Encrypt and send. ``relay`` bytes obey the ``one_byte_records`` fault."""
        if self.server_done or self.sslobj is None or self.phase is _Phase.CLOSED:
            return
        one_byte = False
        if relay:
            with self.state.lock:
                one_byte = self.state.one_byte_records
        try:
            if one_byte:
                view = memoryview(data)
                for i in range(len(view)):
                    self.sslobj.write(view[i : i + 1])
            else:
                self.sslobj.write(data)
        except ssl.SSLError as exc:
            self._close(f"TLS error while sending: {_describe_ssl_error(exc)}", abort=True)
            return
        self.bytes_to_client += len(data)
        self._flush()

    def _finish_to_client(self) -> None:
        """No more data for the client: close_notify, then FIN; keep reading what it sends."""
        if self.server_done or self.phase is _Phase.CLOSED:
            return
        self.server_done = True
        self._send_close_notify()
        self._write_eof()
        self._maybe_done()

    def _send_close_notify(self) -> None:
        if self.sslobj is None:
            return
        # unwrap() sends close_notify and then tries once to read the peer's. That second step
        # only ever sees a partial record here (complete records are always drained first), so
        # no client data can be discarded by it; later records are read with SSLObject.read.
        with contextlib.suppress(ssl.SSLError):
            self.sslobj.unwrap()
        self._flush()

    def _client_eof(self, how: str) -> None:
        if self.client_done:
            return
        self.client_done = True
        if self.phase is _Phase.RELAY:
            if self.echo:
                self._finish_to_client()  # echo has nothing left to send
                return
            if self.backend is not None and self.backend.transport is not None:
                t = self.backend.transport
                if not t.is_closing() and t.can_write_eof():
                    t.write_eof()
            self._maybe_done()
        elif self.phase is _Phase.CONNECTING:
            return  # the EOF is passed on once the backend is connected
        elif self.phase is not _Phase.CLOSED:
            self._close(f"client closed during {self.phase.value} ({how})")

    def _maybe_done(self) -> None:
        if self.client_done and self.server_done and self.phase is not _Phase.CLOSED:
            self._close("completed")

    # --- flow control ----------------------------------------------------------------------------
    def pause_client_reading(self, why: str) -> None:
        if not self.read_pauses and self.transport is not None:
            self.transport.pause_reading()
        self.read_pauses.add(why)

    def resume_client_reading(self, why: str) -> None:
        if why not in self.read_pauses:
            return
        self.read_pauses.discard(why)
        if not self.read_pauses and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # --- timers and closing ----------------------------------------------------------------------
    def _arm_timer(self, delay: float, reason: str) -> None:
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(delay, self._timeout, reason)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timeout(self, reason: str) -> None:
        self.timer = None
        if self.phase is _Phase.LINGER:
            self._close(self.reason)
            return
        if self.phase in (_Phase.CREDENTIALS, _Phase.HANDSHAKE):
            self._handshake_failed(reason)
            return
        log.info("closing %s at %s: %s", self.peer, self.instance.name.short, reason)
        if not self.server_done:
            self.server_done = True
            self._send_close_notify()  # a clean TLS close: the client sees EOF, not truncation
        self._close(reason)

    def _refuse(self, reason: str) -> None:
        log.info("refused %s at %s: %s", self.peer, self.instance.name.short, reason)
        self._linger(reason)

    def _linger(self, reason: str, close_notify: bool = True) -> None:
        """Graceful close after a refusal: close_notify (if the session is up), FIN, then wait
        for the client's EOF, discarding its input."""
        if self.phase in (_Phase.CLOSED, _Phase.LINGER):
            return
        self.reason = reason
        self._stop_backend()
        self.phase = _Phase.LINGER
        self.server_done = True
        if close_notify:
            self._send_close_notify()
        else:
            self._flush()  # the alert, if any
        self._write_eof()
        if self.client_done:
            self._close(reason)
            return
        self._arm_timer(LINGER_S, reason)

    def _stop_backend(self) -> None:
        if self.backend_task is not None and not self.backend_task.done():
            self.backend_task.cancel()
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.close()

    def _close(self, reason: str, abort: bool = False) -> None:
        """The one way a connection ends; idempotent."""
        if self.phase is _Phase.CLOSED:
            return
        self.phase = _Phase.CLOSED
        self.reason = reason
        self._cancel_timer()
        self._stop_backend()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()  # flushes what is queued, then FIN

    def abort(self, reason: str) -> None:
        """Used at shutdown: drop the connection without ceremony."""
        self._close(reason, abort=True)


def _describe_ssl_error(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return str(exc)


# --- the listeners ------------------------------------------------------------------------------
class ServerSide:
    """Listens on ``(address, port)`` for every address of every instance.

    Must be started and closed on the loop that serves it; ``state`` and ``pki`` may be changed
    from other threads at any time (faults, rotation) and are read per connection.
    """

    def __init__(self, state: EmulatorState, pki: PKI, port: int = DEFAULT_PORT) -> None:
        """``port`` 0 lets the OS pick one per address (tests)."""
        self.state = state
        self.pki = pki
        self.port = port
        self.servers: list[asyncio.Server] = []
        self.connections: set[ServerConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        # instance URI -> (generation, context); one entry per instance, newest generation wins
        self._contexts: dict[str, tuple[int, ssl.SSLContext]] = {}
        self._building: dict[tuple[str, int], asyncio.Future[ssl.SSLContext]] = {}

    async def start(self) -> list[tuple[str, int]]:
        """Build every instance's context, then listen; returns the bound (address, port)s."""
        loop = asyncio.get_running_loop()
        for instance in self.state.instances.values():
            ctx = self.context_for(instance)
            if not isinstance(ctx, ssl.SSLContext):
                await ctx
        bound: list[tuple[str, int]] = []
        for instance in self.state.instances.values():
            for addr in instance.addresses():
                server = await loop.create_server(
                    functools.partial(ServerConnection, self, instance),
                    addr,
                    self.port,
                    backlog=LISTEN_BACKLOG,
                    reuse_address=True,
                )
                self.servers.append(server)
                for sock in server.sockets:
                    name = sock.getsockname()
                    bound.append((str(name[0]), int(name[1])))
        return bound

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.abort("emulator shutting down")
        for task in list(self.tasks):
            task.cancel()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()
        await asyncio.sleep(0)  # let connection_lost callbacks run

    def context_for(self, instance: Instance) -> ssl.SSLContext | asyncio.Future[ssl.SSLContext]:
        """The context of the cluster's current CA generation, or a future while it is built.

        ``PKI.generation`` is a dictionary lookup; building (possibly generating an RSA key) runs
        in the default executor so the loop keeps serving other connections meanwhile.
        """
        uri = instance.name.uri
        generation = self.pki.generation(instance.name.cluster_parent)
        cached = self._contexts.get(uri)
        if cached is not None and cached[0] >= generation:
            return cached[1]
        key = (uri, generation)
        fut = self._building.get(key)
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            self._building[key] = fut
            build = loop.run_in_executor(None, self._build, instance)
            build.add_done_callback(functools.partial(self._built, key, fut))
        return fut

    def _build(self, instance: Instance) -> tuple[int, ssl.SSLContext]:
        creds = self.pki.server_credentials(instance)
        return creds.generation, server_ssl_context(creds)

    def _built(
        self,
        key: tuple[str, int],
        fut: asyncio.Future[ssl.SSLContext],
        build: asyncio.Future[tuple[int, ssl.SSLContext]],
    ) -> None:
        self._building.pop(key, None)
        if build.cancelled():
            fut.cancel()
            return
        exc = build.exception()
        if exc is not None:
            log.error("cannot build the server context of %s: %s", key[0], exc)
            fut.set_exception(exc)
            return
        generation, ctx = build.result()
        cached = self._contexts.get(key[0])
        if cached is None or cached[0] < generation:
            self._contexts[key[0]] = (generation, ctx)
            log.info("server context for %s: CA generation %d", key[0], generation)
        fut.set_result(ctx)
