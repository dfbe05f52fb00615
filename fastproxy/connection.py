"""One proxied session: a local plaintext client socket spliced to a TLS connection to AlloyDB.

States and the only transitions allowed between them::

    PENDING ──► CONNECTING ──► HANDSHAKE ──► EXCHANGE ──► SPLICING ──► DRAINING ──► CLOSED
       │             │              │  └──────────────────►┘             │
       └─────────────┴──────────────┴──────────► CLOSED ◄────────────────┘

* PENDING: no connection info published yet (first refresh still running); nothing is dialled.
* CONNECTING: non-blocking ``connect_ex`` issued, waiting for writability and ``SO_ERROR``.
* HANDSHAKE: TLS 1.3 client handshake through memory BIOs; SAN checked on completion.
* EXCHANGE: metadata exchange request sent, response decoded incrementally.
* SPLICING: bytes flow both ways. DRAINING: one direction has finished (half-close) while the
  other still flows or flushes. CLOSED: one idempotent path, one log line.

Copies per forwarded byte (user space; the kernel's own socket copies are not counted):

* client → AlloyDB: ``recv_into`` a loop-wide scratch buffer (kernel copy) → ``SSL_write``
  encrypts into the BIO (1: the encryption pass) → ``bio_read`` returns a new ``bytes`` (1 copy)
  → ``send`` (kernel copy). Two user-space passes, one of them the unavoidable encryption.
* AlloyDB → client: ``recv_into`` the scratch buffer → ``bio_write`` into the BIO (1 copy) →
  ``SSL_read`` decrypts straight into a pooled slab (1: the decryption pass) → ``send`` from the
  slab's memoryview (kernel copy). Two user-space passes, one of them the decryption.

Backpressure: each direction has a send queue with high/low watermarks. While the queue towards
the client is above its high mark we stop reading from AlloyDB (and stop pulling plaintext out of
OpenSSL); while the queue towards AlloyDB is above its high mark we stop reading from the client.
Memory per connection is therefore bounded by the high marks plus one slab and one TLS record.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastproxy.buffers import BufferPool, SendQueue
from fastproxy.errors import ExchangeRefused, ProtocolError, TLSFailure
from fastproxy.mdx import ResponseDecoder, check_response, encode_request
from fastproxy.source import ConnectionInfoSource, DialInfo
from fastproxy.tls import TLSClientSession

if TYPE_CHECKING:
    from fastproxy.loop import Loop, TimerHandle
    from fastproxy.stats import InstanceCounters, Stats

log = logging.getLogger("fastproxy.connection")


class State(enum.Enum):
    PENDING = "pending"
    CONNECTING = "connecting"
    HANDSHAKE = "handshake"
    EXCHANGE = "exchange"
    SPLICING = "splicing"
    DRAINING = "draining"
    CLOSED = "closed"


ALLOWED: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.CONNECTING, State.CLOSED}),
    State.CONNECTING: frozenset({State.HANDSHAKE, State.CLOSED}),
    State.HANDSHAKE: frozenset({State.EXCHANGE, State.SPLICING, State.CLOSED}),
    State.EXCHANGE: frozenset({State.SPLICING, State.CLOSED}),
    State.SPLICING: frozenset({State.DRAINING, State.CLOSED}),
    State.DRAINING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A bug: the state machine was asked to take an edge that is not in ``ALLOWED``."""


class Shared:
    """What every connection of one loop shares: the loop, the pool, scratch buffers, settings.

    The scratch buffers are safe to share because the loop is single-threaded and every byte read
    into them is handed to OpenSSL (which copies it) or to a socket before the handler returns.
    """

    def __init__(
        self,
        loop: Loop,
        pool: BufferPool,
        stats: Stats,
        *,
        dial_timeout: float = 30.0,
        exchange_timeout: float = 30.0,
        high_water: int = 256 * 1024,
        low_water: int = 64 * 1024,
        scratch_size: int = 256 * 1024,
        resolver: Callable[[str, int, Callable[[list[str] | Exception], None]], None] | None = None,
        on_close: Callable[[Connection], None] | None = None,
        on_out_of_fds: Callable[[], bool] | None = None,
    ) -> None:
        self.loop = loop
        self.pool = pool
        self.stats = stats
        self.dial_timeout = dial_timeout
        self.exchange_timeout = exchange_timeout
        self.high_water = high_water
        self.low_water = low_water
        self.scratch = bytearray(scratch_size)
        self.scratch_view = memoryview(self.scratch)
        self.resolver = resolver
        self.on_close = on_close
        # Called when the upstream socket cannot be opened for lack of descriptors (the client was
        # accepted with the last one): stop accepting, and return True if a reserve descriptor was
        # released so that one retry can succeed.
        self.on_out_of_fds = on_out_of_fds
        self.debug = log.isEnabledFor(logging.DEBUG)


class _Side:
    """Selector handler for one of a connection's two sockets (the loop dispatches to it)."""

    __slots__ = ("on_readable", "on_writable")

    def __init__(self, on_readable: Callable[[], None], on_writable: Callable[[], None]) -> None:
        self.on_readable = on_readable
        self.on_writable = on_writable


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Connection:
    """A client socket and its upstream; owned by the loop thread."""

    __slots__ = (
        "_client_read",
        "_client_write",
        "_deadline",
        "_decoder",
        "_t_dial",
        "_t_tls",
        "_up_read",
        "_up_write",
        "bytes_down",
        "bytes_up",
        "client",
        "client_eof",
        "client_fd",
        "client_shut",
        "close_reason",
        "counters",
        "info",
        "peer",
        "shared",
        "source",
        "started",
        "state",
        "tls",
        "tls_shut",
        "to_client",
        "to_upstream",
        "up",
        "up_fd",
        "upstream_eof",
    )

    def __init__(
        self, shared: Shared, client: socket.socket, peer: str, source: ConnectionInfoSource
    ) -> None:
        self.shared = shared
        self.client = client
        self.client_fd = client.fileno()
        self.peer = peer
        self.source = source
        self.state = State.PENDING
        self.info: DialInfo | None = None
        self.up: socket.socket | None = None
        self.up_fd = -1
        self.tls: TLSClientSession | None = None
        self._decoder: ResponseDecoder | None = None
        self._deadline: TimerHandle | None = None
        self.to_client = SendQueue(shared.pool, shared.high_water, shared.low_water)
        self.to_upstream = SendQueue(shared.pool, shared.high_water, shared.low_water)
        self.client_eof = False  # client sent FIN
        self.upstream_eof = False  # TLS stream from AlloyDB ended
        self.client_shut = False  # we sent FIN to the client
        self.tls_shut = False  # we sent close_notify
        self.bytes_up = 0
        self.bytes_down = 0
        self.close_reason = ""
        self.started = time.monotonic()
        # Per-instance counters (metrics): one dict lookup per connection, none per read.
        self.counters: InstanceCounters = shared.stats.instance(source.name)
        self._t_dial = 0.0  # monotonic: dialling began (connection info in hand)
        self._t_tls = 0.0  # monotonic: TCP connected, TLS handshake began
        self._client_read = False
        self._client_write = False
        self._up_read = False
        self._up_write = False

    # ------------------------------------------------------------------------------------------
    # state machine
    def _to(self, new: State) -> None:
        if new not in ALLOWED[self.state]:
            raise IllegalTransition(f"{self.state.value} -> {new.value}")
        self.state = new

    def start(self) -> None:
        """Begin: dial now if connection info is published, else wait for it (PENDING)."""
        self.shared.loop.register(
            self.client, _Side(self._on_client_readable, self._on_client_writable), False, False
        )
        self._client_read = self._client_write = False
        self._deadline = self.shared.loop.call_later(self.shared.dial_timeout, self._on_deadline)
        info = self.source.current()
        if info is not None:
            self._dial(info)
        elif (err := self.source.error()) is not None:
            self._failed("no_connection_info")
            self.close(f"no connection info for {self.source.name}: {err}", error=True)
        else:
            self.source.when_ready(self._on_source_ready)

    def _on_source_ready(self) -> None:
        if self.state is not State.PENDING:
            return
        info = self.source.current()
        if info is not None:
            self._dial(info)
            return
        err = self.source.error()
        if err is not None:
            self._failed("no_connection_info")
            self.close(f"no connection info for {self.source.name}: {err}", error=True)
        else:
            self.source.when_ready(self._on_source_ready)

    def _dial(self, info: DialInfo) -> None:
        self.info = info
        self._t_dial = time.monotonic()
        if _is_ip_literal(info.address) or self.shared.resolver is None:
            self._connect(info.address)
            return
        self.shared.resolver(info.address, info.port, self._on_resolved)

    def _on_resolved(self, result: list[str] | Exception) -> None:
        if self.state is not State.PENDING:
            return
        if isinstance(result, Exception) or not result:
            assert self.info is not None
            self._dial_failed("dns")
            self.close(f"cannot resolve {self.info.address}: {result}", error=True)
            return
        self._connect(result[0])

    def _connect(self, ip: str) -> None:
        info = self.info
        assert info is not None
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            up = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            retry = self.shared.on_out_of_fds
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or retry is None or not retry():
                self._failed("socket")
                self.close(f"cannot open a socket to {info.address}: {exc.strerror}", error=True)
                return
            try:
                up = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc2:
                self._failed("socket")
                self.close(f"cannot open a socket to {info.address}: {exc2.strerror}", error=True)
                return
        self.up = up
        self.up_fd = up.fileno()
        up.setblocking(False)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        err = up.connect_ex((ip, info.port))
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            self._dial_failed("connect")
            self.close(
                f"failed to dial {ip}:{info.port}: {errno.errorcode.get(err, err)}", error=True
            )
            return
        self._to(State.CONNECTING)
        self.shared.loop.register(
            up, _Side(self._on_up_readable, self._on_up_writable), False, True
        )
        self._up_read, self._up_write = False, True

    def _dial_failed(self, reason: str) -> None:
        """A connect/TLS/timeout failure: counted, and the source may refresh its certificate."""
        self.shared.stats.failed(self.counters, reason, dial=True)
        self.source.dial_failed(reason)

    def _failed(self, reason: str) -> None:
        """A session that ends before splicing for a reason that is not a dial failure."""
        self.shared.stats.failed(self.counters, reason, dial=False)

    def _on_deadline(self) -> None:
        self._deadline = None
        if self.state in (State.PENDING, State.CONNECTING, State.HANDSHAKE):
            where = {
                State.PENDING: "waiting for connection info",
                State.CONNECTING: "connecting",
                State.HANDSHAKE: "in the TLS handshake",
            }[self.state]
            if self.state is not State.PENDING:
                self._dial_failed("timeout")
            else:  # no info published in time, or (info set) the PSC name still resolving
                self._failed("timeout" if self.info is not None else "no_connection_info")
            target = f"{self.info.address}:{self.info.port}" if self.info else self.source.name
            self.close(f"timed out {where} ({target})", error=True)
        elif self.state is State.EXCHANGE:
            self._failed("timeout")
            self.close("timed out waiting for the metadata exchange response", error=True)

    # ------------------------------------------------------------------------------------------
    # interest bookkeeping (the loop's modify() is skipped when nothing changes)
    def _update_interest(self) -> None:
        if self.state is State.CLOSED:
            return
        splicing = self.state in (State.SPLICING, State.DRAINING)
        cr = splicing and not self.client_eof and not self.to_upstream.throttled
        cw = bool(self.to_client)
        if cr != self._client_read or cw != self._client_write:
            self._client_read, self._client_write = cr, cw
            self.shared.loop.modify(self.client_fd, cr, cw)
        if self.up is None:
            return
        ur = self.state in (State.HANDSHAKE, State.EXCHANGE) or (
            splicing and not self.upstream_eof and not self.to_client.throttled
        )
        uw = self.state is State.CONNECTING or bool(self.to_upstream)
        if ur != self._up_read or uw != self._up_write:
            self._up_read, self._up_write = ur, uw
            self.shared.loop.modify(self.up_fd, ur, uw)

    # ------------------------------------------------------------------------------------------
    # upstream side
    def _on_up_writable(self) -> None:
        if self.state is State.CONNECTING:
            assert self.up is not None and self.info is not None
            err = self.up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._dial_failed("connect")
                self.close(
                    f"failed to dial {self.info.address}:{self.info.port}: "
                    f"{errno.errorcode.get(err, err)} ({os.strerror(err)})",
                    error=True,
                )
                return
            self._to(State.HANDSHAKE)
            self._t_tls = time.monotonic()
            self.tls = TLSClientSession(self.info.context, self.info.address)
            self._pump_upstream()
            return
        self._flush_upstream()
        self._update_interest()
        self._maybe_finish()

    def _on_up_readable(self) -> None:
        up, tls = self.up, self.tls
        assert up is not None and tls is not None
        try:
            n = up.recv_into(self.shared.scratch_view)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._upstream_broken(f"upstream read failed: {exc.strerror or exc}")
            return
        if n:
            tls.receive_ciphertext(self.shared.scratch_view[:n])
        else:
            tls.receive_eof()
        self._pump_upstream()

    def _upstream_broken(self, reason: str) -> None:
        if self.state in (State.CONNECTING, State.HANDSHAKE):
            self._dial_failed("tls")
        elif self.state is State.EXCHANGE:
            self._failed("exchange")
        self.close(reason, error=True)

    def _pump_upstream(self) -> None:
        """Drive TLS after new ciphertext (or a resume): handshake, exchange, then data."""
        tls = self.tls
        assert tls is not None
        if self.state is State.HANDSHAKE:
            try:
                done = tls.do_handshake()
            except TLSFailure as exc:
                self._flush_upstream()
                self._dial_failed("tls")
                self.close(str(exc), error=True)
                return
            if not done:
                self._flush_upstream()
                self._update_interest()
                return
            self.counters.tls_latency.observe(time.monotonic() - self._t_tls)
            assert self.info is not None
            if self.info.metadata_exchange:
                self._to(State.EXCHANGE)
                # The handshake is done; the exchange gets its own deadline (30 s, as Go's).
                if self._deadline is not None:
                    self._deadline.cancel()
                self._deadline = self.shared.loop.call_later(
                    self.shared.exchange_timeout, self._on_deadline
                )
                self._decoder = ResponseDecoder()
                tls.send(
                    memoryview(
                        encode_request(
                            self.info.user_agent, self.info.auth_type, self.info.exchange_token
                        )
                    )
                )
            else:
                self._start_splicing()
        if self.state is State.EXCHANGE and not self._read_exchange():
            return
        if self.state in (State.SPLICING, State.DRAINING):
            self._read_upstream_data()
        self._flush_upstream()
        self._update_interest()
        self._maybe_finish()

    def _read_exchange(self) -> bool:
        """Feed decrypted bytes to the exchange decoder; True once splicing may start."""
        tls, decoder = self.tls, self._decoder
        assert tls is not None and decoder is not None
        view = self.shared.scratch_view
        while True:
            try:
                n = tls.recv_into(view)
            except TLSFailure as exc:
                # A refused client certificate shows up here, on the first read (protocol §3.4).
                self._dial_failed("tls")
                self.close(f"TLS error during the metadata exchange: {exc}", error=True)
                return False
            if n is None:
                self._flush_upstream()
                self._update_interest()
                return False
            if n == 0:
                self._failed("exchange")
                self.close("server closed the connection during the metadata exchange", error=True)
                return False
            try:
                resp = decoder.feed(view[:n])
                if resp is None:
                    continue
                check_response(resp)
            except (ProtocolError, ExchangeRefused) as exc:
                self._failed("exchange")
                self.close(str(exc), error=True)
                return False
            leftover = decoder.unused
            self._decoder = None
            self._start_splicing()
            if leftover:
                self._queue_to_client_bytes(leftover)
            return True

    def _start_splicing(self) -> None:
        self._to(State.SPLICING)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.counters.dial_latency.observe(time.monotonic() - self._t_dial)
        self.shared.stats.connected(self)

    def _read_upstream_data(self) -> None:
        """Decrypt into pooled slabs and send them to the client, until OpenSSL runs dry or the
        client's queue stays above its low-water mark.

        Stopping at the high-water mark can leave whole records in the read BIO that no socket
        event will announce again (the server may have sent its last byte long ago). So when the
        flush that follows drains the queue below the low-water mark in one go, there will be no
        writability event to resume on either: decrypting must go on here, or the connection
        stalls with the end of the stream inside OpenSSL.
        """
        queue = self.to_client
        while True:
            drained = self._decrypt_to_client()
            self._flush_client()
            if drained or self.upstream_eof or queue.throttled or self.state is State.CLOSED:
                return

    def _decrypt_to_client(self) -> bool:
        """Queue decrypted data until the high-water mark; True if OpenSSL has nothing left."""
        tls = self.tls
        assert tls is not None
        pool, queue = self.shared.pool, self.to_client
        while not self.upstream_eof and not queue.is_above_high:
            slab = pool.borrow()
            # An exhausted pool degrades to copying out of the scratch buffer: memory stays
            # bounded by the high-water mark either way, and no connection starves.
            target = slab.view if slab is not None else self.shared.scratch_view[: pool.slab_size]
            got = 0
            ended = ""
            size = len(target)
            while got < size:
                try:
                    n = tls.recv_into(target[got:])
                except TLSFailure as exc:
                    ended = f"upstream TLS error: {exc}"
                    break
                if n is None:
                    break
                if n == 0:
                    ended = "upstream closed"
                    break
                got += n
            self.bytes_down += got
            if slab is None:
                if got:
                    queue.push_bytes(bytes(target[:got]))
            elif got:
                slab.start, slab.end = 0, got
                if got < size and not queue:
                    # All OpenSSL had, nothing queued ahead of it (a request's reply, the usual
                    # case): straight to the client socket.
                    try:
                        queue.send_or_push(self.client, slab)
                    except OSError as exc:
                        self.close(f"client write failed: {exc.strerror or exc}", error=False)
                        return True
                else:
                    queue.push_slab(slab)
            else:
                pool.give_back(slab)
            if ended:
                self.upstream_eof = True
                if ended != "upstream closed":
                    self.close_reason = ended
                self._enter_draining()
                return True
            if got < size:
                return True
        return self.upstream_eof

    # ------------------------------------------------------------------------------------------
    # client side
    def _on_client_readable(self) -> None:
        tls = self.tls
        assert tls is not None
        view = self.shared.scratch_view
        try:
            n = self.client.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"client read failed: {exc.strerror or exc}", error=False)
            return
        if n == 0:
            self.client_eof = True
            if not self.tls_shut:
                self.tls_shut = True
                tls.shutdown()  # our half-close: close_notify, keep reading AlloyDB
            self._enter_draining()
        else:
            self.bytes_up += n
            data = view[:n]
            sent = 0
            while sent < n:
                sent += tls.send(data[sent:])
        self._flush_upstream()
        self._update_interest()
        self._maybe_finish()

    def _on_client_writable(self) -> None:
        self._flush_client()
        if not self.to_client.throttled and self.state in (State.SPLICING, State.DRAINING):
            # Resume: OpenSSL may already hold decrypted records that no socket event will
            # announce again, so pull them now rather than waiting for upstream readability.
            self._read_upstream_data()
        self._update_interest()
        self._maybe_finish()

    # ------------------------------------------------------------------------------------------
    # flushing
    def _flush_upstream(self) -> None:
        tls, up = self.tls, self.up
        if tls is None or up is None:
            return
        out = tls.outgoing()
        try:
            if out:
                self.to_upstream.send_or_push(up, out)
            elif self.to_upstream:
                self.to_upstream.flush_to(up)
        except OSError as exc:
            self._upstream_broken(f"upstream write failed: {exc.strerror or exc}")

    def _flush_client(self) -> None:
        if not self.to_client:
            return
        try:
            self.to_client.flush_to(self.client)
        except OSError as exc:
            self.close(f"client write failed: {exc.strerror or exc}", error=False)

    def _queue_to_client_bytes(self, data: bytes) -> None:
        self.bytes_down += len(data)
        self.to_client.push_bytes(data)

    # ------------------------------------------------------------------------------------------
    # half-close and completion
    def _enter_draining(self) -> None:
        if self.state is State.SPLICING:
            self._to(State.DRAINING)

    def _maybe_finish(self) -> None:
        if self.state is State.CLOSED:
            return
        if self.upstream_eof and not self.to_client and not self.client_shut:
            if self.close_reason:
                # Upstream failed or truncated: what it sent has been delivered; nothing more can
                # follow, so close both sides now.
                self.close(self.close_reason, error=True)
                return
            self.client_shut = True
            with contextlib.suppress(OSError):
                self.client.shutdown(socket.SHUT_WR)
        if self.client_shut and self.tls_shut and not self.to_upstream:
            self.close("closed by both sides", error=False)

    def close(self, reason: str, error: bool = False) -> None:
        """The only way out. Idempotent; returns every slab; logs one line."""
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        loop = self.shared.loop
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        for sock, fd in ((self.client, self.client_fd), (self.up, self.up_fd)):
            if sock is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                loop.unregister(fd)
            sock.close()
        self.to_client.clear()
        self.to_upstream.clear()
        self.close_reason = reason
        self.shared.stats.closed(self, error)
        if error:
            log.warning(
                "[%s] connection from %s closed: %s (sent %d, received %d bytes)",
                self.source.name,
                self.peer,
                reason,
                self.bytes_up,
                self.bytes_down,
            )
        elif self.shared.debug:
            log.debug(
                "[%s] connection from %s closed: %s (sent %d, received %d bytes)",
                self.source.name,
                self.peer,
                reason,
                self.bytes_up,
                self.bytes_down,
            )
        if self.shared.on_close is not None:
            self.shared.on_close(self)
