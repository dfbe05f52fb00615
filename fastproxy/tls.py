"""The client side of TLS 1.3 to an AlloyDB instance, as a byte pump with no sockets.

``tls`` knows bytes: :class:`TLSClientSession` wraps an ``OpenSSL.SSL.Connection`` created with
``socket=None``, i.e. over two memory BIOs. The connection layer moves ciphertext between those BIOs
and the socket; this module never sees a file descriptor, never blocks and never sleeps.

The contract
============

Who feeds what. Ciphertext read from the server socket goes in with :meth:`receive_ciphertext`
(``bio_write``; a memory BIO takes everything, it grows instead of refusing). Ciphertext for the
server comes out of :meth:`outgoing` (``bio_read``); call it after *every* operation that can
produce output (``do_handshake``, ``send``, ``shutdown``, and ``recv_into`` when it returns None or
raises); it returns everything pending (``b""`` when nothing is), to be written to the socket
(queue the remainder of a partial socket write; it is opaque ciphertext, order is all that
matters). Plaintext goes in with :meth:`send` and comes out with :meth:`recv_into`. End of the
server's byte stream goes in with :meth:`receive_eof` so OpenSSL can tell a truncation from a wait.

WantRead. Every OpenSSL call here can stop with ``WantReadError``: it needs ciphertext that has not
arrived. The pump reports it as "not yet" (``do_handshake`` -> False, ``recv_into`` -> None,
``send`` -> 0) and the caller must retry *the same call with the same buffer* once more ciphertext
was fed. Nothing is lost meanwhile: undecrypted records stay in the read BIO, half-processed state
stays in the SSL object. ``WantWriteError`` cannot happen with a memory write BIO (it never fills)
and is treated like WantRead for robustness.

Partial writes. The contexts built by :mod:`fastproxy.tlsctx` clear
``SSL_MODE_ENABLE_PARTIAL_WRITE`` (pyOpenSSL sets it by default) because the memory BIO always
accepts: ``SSL_write`` then encrypts the whole buffer, as many 16 KiB records as needed, in one
call, and :meth:`send` returns the full length. :meth:`send` still returns a count and callers must
honour it, because a context built elsewhere may keep partial writes on (then one call encrypts one
record), and during the handshake it returns 0. ``SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER`` stays on,
so the retry after a 0 may pass another buffer object holding the same bytes.

Closing. ``ZeroReturnError`` from ``SSL_read`` means the server sent close_notify: a clean end of
its stream, reported as ``recv_into`` -> 0 and :attr:`peer_closed`. The server may still read what
we send (TLS 1.3 closes each direction separately). Transport EOF without close_notify
(``receive_eof`` then ``SSL_read`` hits the end of the BIO) is a truncation: an attacker or a crash
could have cut the stream, so ``recv_into`` raises :class:`TLSFailure` saying "truncated". The
caller maps the first to a half-close towards the client (``SHUT_WR``) and the second to a reset.
:meth:`shutdown` sends our close_notify (the client did ``SHUT_WR``) and leaves the read side open:
``recv_into`` keeps delivering until the server closes too.

Post-handshake messages. TLS 1.3 servers send NewSessionTicket right after the handshake and may
send KeyUpdate at any time. They arrive as records like application data and are consumed inside
``SSL_read``: a ``recv_into`` that only met such records returns None (WantRead) although
ciphertext was fed. A KeyUpdate that requests ours is answered by OpenSSL with our next write; that
is why ``recv_into`` flags possible output when it returns None.

Bytes buffered after the handshake. The ciphertext fed while handshaking may already contain
records that follow the server's Finished (0.5-RTT data, NewSessionTicket, the first response), and
one record decrypts to up to 16 KiB, more than a small ``recv_into`` buffer takes. Neither will
ever make the socket readable again. So: when ``do_handshake`` returns True, and whenever a read
pass stops for any reason other than None (a full buffer, backpressure), the caller must call
``recv_into`` again *without waiting for the socket*, until it returns None. That drain rule is the
only way the pump can lose data, and it is the caller's half of the contract.

Server name. pyOpenSSL has no public hostname-check API (OpenSSL's ``X509_VERIFY_PARAM_set1_host``
and ``_set1_ip`` are only reachable through pyOpenSSL's private bindings). OpenSSL verifies the
chain against the instance CA during the handshake; right after it completes we check the peer
certificate's subjectAltName with cryptography (:func:`check_server_name`): an IP literal must equal
an ``iPAddress`` entry, a DNS name an ``dNSName`` entry (case-insensitive, trailing dots ignored, a
``*`` allowed as the whole left-most label). The subject CN is never consulted. A mismatch raises
before any application byte is sent or returned. SNI is sent for DNS names only (trailing dot
stripped), never for IP literals (RFC 6066).

Memory. An idle session costs ~40 KiB of OpenSSL heap that no public API can release: the
SSL object (~7 KiB), its read and write record layers (~4.4 KiB each), the server's certificate
chain kept in the session (~8 KiB for two certificates), the AES-GCM states, the session ticket
and, with OpenSSL >= 3.5's default groups, both ClientHello key shares (X25519MLKEM768 and X25519,
~9 KiB; an ``OPENSSL_CONF`` with ``Groups = X25519`` drops them, at the price of the post-quantum
key exchange, so it is not our default). What can be released is: the contexts set
``SSL_MODE_RELEASE_BUFFERS`` (the 16-34 KiB record buffers are freed whenever empty), the verify
callback's slot is dropped after the handshake, and the two memory BIOs, which never shrink (they
keep 4/3 of the most ciphertext they ever held: ~7.5 KiB after the handshake flights and tickets,
~340 KiB after one 256 KiB read), are replaced by empty ones once drained (``BIO_RELEASE_ABOVE``;
the write BIO not in the middle of an upload, ``WBIO_KEEP_ABOVE``). ``perf/idle_memory.py``
measures the whole proxy per idle connection.

Copies per plaintext byte (pyOpenSSL 26 on memory BIOs):

* client -> server: ``recv_into`` a pooled slab (kernel copy, not ours) -> ``send(memoryview)``,
  no copy on the way in (cffi ``from_buffer``), ``SSL_write`` encrypts into the record buffer and
  ``BIO_write`` copies the record into the memory BIO (**1**) -> ``bio_read`` copies into a
  temporary cffi buffer (**2**) and slices it into a new ``bytes`` (**3**) -> socket ``send``
  (kernel copy). Three user-space copies of each ciphertext byte besides the encryption itself.
* server -> client: socket ``recv_into`` a slab (kernel copy) -> ``receive_ciphertext`` copies into
  the read BIO (**1**) -> ``SSL_read`` copies each record from the BIO into OpenSSL's record buffer
  (**2**), decrypts it in place and copies the plaintext into pyOpenSSL's temporary buffer (**3**)
  -> ``recv_into`` copies that into our slab (**4**) -> socket ``send`` (kernel copy). Four.

The last two copies in each direction are pyOpenSSL's (a temporary buffer, then ``bytes`` or the
slab); removing them needs its private cffi bindings, which we do not use. Memcpy runs at tens of
GB/s; at the 64 KiB the benchmark moves, AES-GCM and the Python calls dominate
(``perf/bench_tls.py``).
"""

from __future__ import annotations

import functools
import ipaddress
import threading
from typing import Any, Final

from cryptography import x509
from OpenSSL import SSL

from fastproxy.errors import TLSFailure
from fastproxy.tlsctx import verify_failure_detail

__all__ = [
    "OUTGOING_CHUNK",
    "TLSClientSession",
    "check_server_name",
    "parse_server_address",
]

# The most ciphertext one ``outgoing()`` call returns. bio_read allocates this many bytes before
# it knows how much is pending, so it is a trade: large enough that 64 KiB of plaintext (4 records,
# about 64.1 KiB of ciphertext) leaves in one call, small enough that the uninitialised allocation
# stays cheap.
OUTGOING_CHUNK: Final = 256 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The data path calls OpenSSL through pyOpenSSL's own cffi bindings (``OpenSSL._util``), the same
# functions pyOpenSSL's methods call, minus their per-call costs: a Python exception for every
# WantRead (one per drained read and per empty write BIO), a temporary buffer and an extra copy per
# SSL_read. Profiling the 100-byte ping-pong showed those wrappers as the largest share of the
# proxy's CPU per request. SSL_read now decrypts straight into the caller's slab (cffi
# ``from_buffer``), SSL_write and BIO_write read the caller's memory in place, and errors other
# than "want more" are still raised by pyOpenSSL's own error translation. When the private names
# are missing (a future pyOpenSSL), every call falls back to the public API: same behaviour,
# slower.
try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _FAST_OK = all(
        hasattr(_lib, name)
        for name in ("SSL_read", "SSL_write", "BIO_read", "BIO_write", "SSL_get_error")
    ) and all(hasattr(SSL.Connection, name) for name in ("_raise_ssl_error",))
    # Swapping a drained memory BIO for a fresh one (see _release_rbio) needs these as well.
    _RELEASE_OK = _FAST_OK and all(
        hasattr(_lib, name) for name in ("BIO_new", "BIO_s_mem", "SSL_set_bio", "BIO_get_mem_data")
    )
    _WANT_READ: int = getattr(_lib, "SSL_ERROR_WANT_READ", 2)
    _WANT_WRITE: int = getattr(_lib, "SSL_ERROR_WANT_WRITE", 3)
    _ZERO_RETURN: int = getattr(_lib, "SSL_ERROR_ZERO_RETURN", 6)
except ImportError:  # pragma: no cover - depends on the installed pyOpenSSL
    _ffi = _lib = None
    _FAST_OK = _RELEASE_OK = False
    _WANT_READ, _WANT_WRITE, _ZERO_RETURN = 2, 3, 6

# Memory BIOs never shrink: OpenSSL's BUF_MEM keeps the largest capacity it ever needed (about 4/3
# of the most ciphertext that was pending at once). The handshake flights and the session tickets
# (which arrive after the handshake, ~2.4 KiB from a Python server) leave ~7.5 KiB in the two BIOs
# of every connection, and one 256 KiB read pins ~340 KiB until the connection closes. So once more
# than this many bytes went through a BIO since it was created, it is replaced by an empty one the
# next time it is found drained (SSL_set_bio frees the old one): a drained BIO never keeps more
# than about 4/3 of this. Each read or write costs one addition and one comparison; a swap (three
# cffi calls, a malloc/free pair, about a microsecond) comes once per KiB of small messages, or
# once per burst of bulk data: noise next to decrypting it.
BIO_RELEASE_ABOVE: Final = 1024
# ...except that the write BIO is kept while a bulk upload is under way, i.e. when the drain just
# done held more than one full record: SSL_write appends record after record to it, and a fresh
# BIO grows by realloc (copy + cleanse) at each, which cost 6 us per 64 KiB (+40%) in
# perf/bench_tls.py. It is released at the first drain of at most one record (any small message
# after the upload), so an upload followed by total silence keeps its buffer until then.
WBIO_KEEP_ABOVE: Final = 16 * 1024 + 512

_scratch = threading.local()  # per thread: one reusable cffi buffer for BIO_read


def _outgoing_buffer() -> Any:
    buf = getattr(_scratch, "buf", None)
    if buf is None:
        buf = _scratch.buf = _ffi.new("char[]", OUTGOING_CHUNK)
    return buf


# Alerts by which a TLS 1.3 server refuses a client certificate ("tlsv13 alert certificate
# required", "sslv3 alert bad certificate", "tlsv1 alert unknown ca", "... certificate expired").
_CERT_ALERT_WORDS: Final = (
    "alert certificate",
    "alert bad certificate",
    "alert unknown ca",
    "alert unsupported certificate",
    "alert access denied",
)


@functools.lru_cache(maxsize=256)
def parse_server_address(address: str) -> tuple[IPAddress | None, str | None]:
    """Split the dialled address into (IP literal, None) or (None, normalised DNS name).

    The DNS name is lower-case ASCII (IDNA A-labels) without trailing dots, the form in which it
    is both sent as SNI and compared with the certificate's dNSName entries. Cached: every
    connection to an instance dials the same address, and the result is immutable, so sessions
    share one parsed address instead of holding an ``ip_address`` object each.
    """
    text = address.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text), None
    except ValueError:
        pass
    name = text.rstrip(".")
    if not name:
        raise ValueError(f"not an IP literal or DNS name: {address!r}")
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"not a valid DNS name: {address!r}") from exc
    return None, ascii_name.lower()


def _dns_matches(pattern: str, name: str) -> bool:
    """Compare a dNSName entry with a normalised name; ``*`` only as the whole left-most label."""
    pattern = pattern.rstrip(".").lower()
    if pattern == name:
        return True
    if pattern.startswith("*.") and "*" not in pattern[2:] and pattern.count(".") >= 2:
        head, dot, rest = name.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:]
    return False


def check_server_name(
    cert: x509.Certificate, ip: IPAddress | None, dns_name: str | None, address: str
) -> None:
    """Raise :class:`TLSFailure` unless ``cert``'s subjectAltName covers the dialled address.

    ``ip``/``dns_name`` come from :func:`parse_server_address`; ``address`` is the text used in
    the message. IP literals match only iPAddress entries, names only dNSName entries (RFC 6125),
    and the subject CN is ignored.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise TLSFailure(
            f"server certificate for {address} has no subjectAltName; "
            "refusing (the CN is not used for name checks)"
        ) from None
    ips = san.get_values_for_type(x509.IPAddress)
    names = san.get_values_for_type(x509.DNSName)
    if ip is not None:
        if ip in ips:
            return
    elif dns_name is not None and any(_dns_matches(p, dns_name) for p in names):
        return
    found = [str(v) for v in ips] + list(names)
    raise TLSFailure(
        f"server certificate does not match the dialled address {address}: "
        f"subjectAltName has {', '.join(found) or 'no IP or DNS entries'}"
    )


def _reason(exc: SSL.Error) -> str:
    """OpenSSL's reason strings from a pyOpenSSL exception, e.g. "certificate verify failed"."""
    if isinstance(exc, SSL.SysCallError):
        return str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    errors = exc.args[0] if exc.args else None
    if isinstance(errors, list) and errors:
        reasons = [str(e[2]) for e in errors if isinstance(e, tuple) and len(e) == 3 and e[2]]
        if reasons:
            return "; ".join(reasons)
    return str(exc) or type(exc).__name__


class TLSClientSession:
    """One TLS 1.3 client connection over memory BIOs. Loop thread only; not thread-safe.

    ``context`` is an immutable client context (see :mod:`fastproxy.tlsctx`); the session keeps it
    for its whole life, whatever is published later. ``address`` is the IP literal or PSC DNS name
    actually dialled: it decides SNI and the subjectAltName check.
    """

    __slots__ = (
        "_address",
        "_conn",
        "_dns",
        "_eof",
        "_fast",
        "_handshake_done",
        "_ip",
        "_maybe_outgoing",
        "_peer_closed",
        "_rbio",
        "_rbio_fed",
        "_release",
        "_shutdown_sent",
        "_ssl",
        "_wbio",
        "_wbio_out",
    )

    def __init__(self, context: SSL.Context, address: str) -> None:
        self._address = address
        self._ip, self._dns = parse_server_address(address)
        conn = SSL.Connection(context, None)
        # The verify callback of tlsctx records the first chain failure here (a list, so no
        # reference cycle between the session and its Connection).
        conn.set_app_data([])
        conn.set_connect_state()
        if self._dns is not None:
            conn.set_tlsext_host_name(self._dns.encode("ascii"))
        self._conn = conn
        ssl_ptr = getattr(conn, "_ssl", None)
        rbio = getattr(conn, "_into_ssl", None)
        wbio = getattr(conn, "_from_ssl", None)
        self._fast = _FAST_OK and None not in (ssl_ptr, rbio, wbio)
        self._ssl, self._rbio, self._wbio = ssl_ptr, rbio, wbio
        self._release = self._fast and _RELEASE_OK
        # Ciphertext bytes that went through the current read / write BIO: past BIO_RELEASE_ABOVE
        # the BIO is replaced once drained (after the handshake only).
        self._rbio_fed = self._wbio_out = 0
        self._eof = False
        self._handshake_done = False
        self._peer_closed = False
        self._shutdown_sent = False
        # "outgoing() may have something": set by every call that can queue ciphertext, cleared
        # when the write BIO is found empty. Saves a bio_read (and its WantRead exception) per call.
        self._maybe_outgoing = False

    # -- properties ------------------------------------------------------------------------------

    @property
    def context(self) -> SSL.Context:
        """The context this session was created with (never changes)."""
        return self._conn.get_context()

    @property
    def address(self) -> str:
        return self._address

    @property
    def handshake_done(self) -> bool:
        return self._handshake_done

    @property
    def peer_closed(self) -> bool:
        """True once the server's close_notify was read (clean end of its stream)."""
        return self._peer_closed

    @property
    def shutdown_sent(self) -> bool:
        """True once our close_notify is queued (our write side is finished)."""
        return self._shutdown_sent

    @property
    def version(self) -> str:
        """The negotiated protocol, "TLSv1.3" once the handshake is done."""
        return self._conn.get_protocol_version_name()

    @property
    def has_outgoing(self) -> bool:
        """False when ``outgoing()`` certainly returns ``b""``; True when it may not."""
        return self._maybe_outgoing

    # -- ciphertext side -------------------------------------------------------------------------

    def receive_ciphertext(self, data: bytes | bytearray | memoryview) -> None:
        """Feed ciphertext read from the server socket (copied into the read BIO at once)."""
        if not data:
            return
        if self._fast:
            n = len(data)
            if _lib.BIO_write(self._rbio, _ffi.from_buffer(data), n) == n:
                self._rbio_fed += n
                return
        self._conn.bio_write(data)

    def receive_eof(self) -> None:
        """The server's TCP stream ended: reading past the buffered bytes is EOF, not WantRead."""
        self._eof = True  # the read BIO carries this state now: never replace it any more
        self._conn.bio_shutdown()

    def outgoing(self) -> bytes:
        """All pending ciphertext for the server, ``b""`` when none.

        The bytes are a fresh object the caller may keep queued. One ``bio_read`` of
        ``OUTGOING_CHUNK`` normally takes everything; only more than that costs a join.
        """
        if not self._maybe_outgoing:
            return b""
        self._maybe_outgoing = False
        if self._fast:
            buf = _outgoing_buffer()
            wbio = self._wbio
            n = _lib.BIO_read(wbio, buf, OUTGOING_CHUNK)
            if n <= 0:
                return b""
            data: bytes = _ffi.buffer(buf, n)[:]
            if n >= OUTGOING_CHUNK:
                parts = [data]
                while (n := _lib.BIO_read(wbio, buf, OUTGOING_CHUNK)) > 0:
                    parts.append(_ffi.buffer(buf, n)[:])
                data = b"".join(parts)
            # The write BIO is empty now: replace it if it may have grown (not mid-upload).
            out = self._wbio_out + len(data)
            self._wbio_out = out
            if (
                out > BIO_RELEASE_ABOVE
                and len(data) <= WBIO_KEEP_ABOVE
                and self._handshake_done
                and self._release
            ):
                self._release_wbio()
            return data
        conn = self._conn
        try:
            data = conn.bio_read(OUTGOING_CHUNK)
        except SSL.WantReadError:
            return b""
        if len(data) < OUTGOING_CHUNK:
            return data
        parts = [data]
        while True:
            try:
                data = conn.bio_read(OUTGOING_CHUNK)
            except SSL.WantReadError:
                break
            parts.append(data)
            if len(data) < OUTGOING_CHUNK:
                break
        return b"".join(parts)

    # -- handshake -------------------------------------------------------------------------------

    def do_handshake(self) -> bool:
        """Advance the handshake; True once it is complete and the server name checked.

        False means: drain ``outgoing()``, feed more ciphertext, call again. On True, drain
        ``outgoing()`` (our Finished) and call ``recv_into`` until None (the drain rule).
        """
        if self._handshake_done:
            return True
        conn = self._conn
        self._maybe_outgoing = True
        try:
            conn.do_handshake()
        except (SSL.WantReadError, SSL.WantWriteError):
            return False
        except SSL.Error as exc:
            raise self._failure("TLS handshake", exc) from exc
        version = conn.get_protocol_version_name()
        if version != "TLSv1.3":
            raise TLSFailure(
                f"TLS handshake with {self._address}: negotiated {version}, need TLSv1.3"
            )
        cert = conn.get_peer_certificate(as_cryptography=True)
        if cert is None:  # pragma: no cover - VERIFY_PEER makes OpenSSL fail first
            raise TLSFailure(f"TLS handshake with {self._address}: server sent no certificate")
        check_server_name(cert, self._ip, self._dns, self._address)
        self._handshake_done = True
        # Handshake-only state: the verify callback's slot is read only while handshaking, and the
        # BIOs grew to hold whole handshake flights (the certificate chains): release them once
        # drained (the Finished goes out with the next outgoing(), the ticket records are read by
        # the next recv_into).
        conn.set_app_data(None)
        self._rbio_fed = self._wbio_out = BIO_RELEASE_ABOVE + 1
        return True

    # -- plaintext side --------------------------------------------------------------------------

    def recv_into(self, buf: memoryview | bytearray) -> int | None:
        """Decrypt into ``buf``: n > 0 bytes, None = feed more ciphertext, 0 = clean close.

        0 means the server sent close_notify (also on every later call). Raises
        :class:`TLSFailure` on truncation (transport EOF without close_notify) and on any alert or
        protocol error, e.g. the server refusing our certificate, which TLS 1.3 reports only here
        (protocol §3.4). After None, drain ``outgoing()``: a post-handshake message may need an
        answer.
        """
        try:
            if self._fast and len(buf):
                ssl_ptr = self._ssl
                r = _lib.SSL_read(ssl_ptr, _ffi.from_buffer(buf, require_writable=True), len(buf))
                if r > 0:
                    return int(r)
                err = _lib.SSL_get_error(ssl_ptr, r)
                if err in (_WANT_READ, _WANT_WRITE):
                    self._maybe_outgoing = True
                    if self._rbio_fed > BIO_RELEASE_ABOVE and self._release:
                        self._release_rbio()
                    return None
                if err == _ZERO_RETURN:
                    self._peer_closed = True
                    return 0
                self._conn._raise_ssl_error(ssl_ptr, r)  # the same exception pyOpenSSL raises
            return self._conn.recv_into(buf)
        except SSL.WantReadError:
            self._maybe_outgoing = True
            return None
        except SSL.ZeroReturnError:
            self._peer_closed = True
            return 0
        except SSL.WantWriteError:  # pragma: no cover - memory write BIOs never fill
            self._maybe_outgoing = True
            return None
        except SSL.SysCallError as exc:
            self._maybe_outgoing = True
            raise TLSFailure(
                f"TLS stream from {self._address} truncated: the connection ended without "
                "close_notify"
            ) from exc
        except SSL.Error as exc:
            self._maybe_outgoing = True
            raise self._failure("TLS read", exc) from exc

    def send(self, data: memoryview | bytes | bytearray) -> int:
        """Encrypt plaintext; returns how many bytes of ``data`` were consumed (0 = retry later).

        The bytes are taken without a copy (cffi ``from_buffer``). Drain ``outgoing()`` after.
        """
        self._maybe_outgoing = True
        try:
            if self._fast and len(data):
                ssl_ptr = self._ssl
                r = _lib.SSL_write(ssl_ptr, _ffi.from_buffer(data), len(data))
                if r > 0:
                    return int(r)
                err = _lib.SSL_get_error(ssl_ptr, r)
                if err in (_WANT_READ, _WANT_WRITE):
                    return 0
                self._conn._raise_ssl_error(ssl_ptr, r)
            return self._conn.send(data)
        except (SSL.WantReadError, SSL.WantWriteError):
            return 0
        except SSL.Error as exc:
            raise self._failure("TLS write", exc) from exc

    def shutdown(self) -> None:
        """Queue our close_notify (the client finished sending); reading continues.

        Idempotent. Before the handshake is complete there is no session to close: do nothing
        and let the caller close the transport.
        """
        if self._shutdown_sent or not self._handshake_done:
            return
        self._maybe_outgoing = True
        try:
            self._conn.shutdown()
        except (SSL.WantReadError, SSL.WantWriteError):  # pragma: no cover - memory BIOs
            pass
        except SSL.Error as exc:
            raise self._failure("TLS shutdown", exc) from exc
        self._shutdown_sent = True

    # -- memory ----------------------------------------------------------------------------------

    def _release_wbio(self) -> None:
        """Replace the (drained) write BIO by an empty one; SSL_set_bio frees the old one."""
        self._wbio_out = 0
        bio = _lib.BIO_new(_lib.BIO_s_mem())
        if bio == _ffi.NULL:  # pragma: no cover - out of memory: keep using the old one
            return
        # Only the wbio changes: OpenSSL adopts this reference and frees the previous BIO.
        _lib.SSL_set_bio(self._ssl, self._rbio, bio)
        self._wbio = bio
        self._conn._from_ssl = bio  # pyOpenSSL's own bio_read/bio_write use these pointers

    def _release_rbio(self) -> None:
        """Replace the read BIO by an empty one if it holds no ciphertext; else try later."""
        if (
            self._eof
            or not self._handshake_done
            or _lib.BIO_get_mem_data(self._rbio, _ffi.NULL) != 0
        ):
            return
        self._rbio_fed = 0
        bio = _lib.BIO_new(_lib.BIO_s_mem())
        if bio == _ffi.NULL:  # pragma: no cover - out of memory: keep using the old one
            return
        # Only the rbio changes (and the two differ): one reference adopted, the old BIO freed,
        # and the record layer re-pointed at the new one.
        _lib.SSL_set_bio(self._ssl, bio, self._wbio)
        self._rbio = bio
        self._conn._into_ssl = bio

    # -- errors ----------------------------------------------------------------------------------

    def _failure(self, phase: str, exc: SSL.Error) -> TLSFailure:
        """Turn a pyOpenSSL error into a TLSFailure that names the server and OpenSSL's reason."""
        if isinstance(exc, SSL.SysCallError):
            return TLSFailure(
                f"{phase} with {self._address} failed: the connection ended unexpectedly"
            )
        reason = _reason(exc)
        detail = verify_failure_detail(self._conn)
        if detail is not None:
            reason = f"{reason}: {detail}"
        if self._handshake_done and any(word in reason for word in _CERT_ALERT_WORDS):
            # TLS 1.3: the server checks our certificate after our handshake finished (§3.4).
            reason += " (the server refused the client certificate)"
        return TLSFailure(f"{phase} with {self._address} failed: {reason}")
