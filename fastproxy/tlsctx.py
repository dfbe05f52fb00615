"""Client TLS contexts for AlloyDB instances, and the point where a new one is published.

One :class:`OpenSSL.SSL.Context` per certificate generation. It is built off the loop (by the
refresher thread, or once at start-up for static material), never mutated afterwards, and handed to
the loop through :class:`ContextHolder` as part of one frozen :class:`ContextInfo`. pyOpenSSL >=
26.2 raises ``ValueError`` if a Context is changed after a Connection used it, which is the
behaviour we rely on rather than fight: a refreshed certificate means a *new* Context, published
with one reference assignment.

What the context enforces (protocol §3):

* TLS 1.3 only (``min = max = TLS1_3``): a server offering anything older fails the handshake.
* The instance's ``caCert`` is the **only** trust anchor. It is added to the context's own
  certificate store from memory; ``set_default_verify_paths`` is never called, so system roots
  play no part. ``PARTIAL_CHAIN`` is set so that ``caCert`` anchors the chain even if it is not
  self-signed, matching Go's ``RootCAs`` semantics (any certificate in the pool is an anchor).
* The client presents the full chain ``[leaf, intermediate, root]``: ``chain[0]`` is the
  certificate, the rest are extra chain certificates sent as given.
* The private key comes from a cryptography object in memory; it is never written to disk.
* Hostname (SAN) checking is **not** part of the context: pyOpenSSL has no public API for it, so
  :mod:`fastproxy.tls` checks the peer certificate's SANs against the dialled address right after
  the handshake (see there).

Session resumption is deliberately off: the context never stores sessions (``SESS_CACHE_OFF``,
``OP_NO_TICKET``) and the pump never calls ``set_session``. Every connection does a full handshake,
so the server authenticates the *current* client certificate each time (a resumed session would
carry the authentication of whichever certificate generation created it), and no session state is
shared between connections or threads. TLS 1.3 servers still send NewSessionTicket messages after
the handshake; OpenSSL parses and drops them during ``SSL_read``. The price is one full handshake
per connection, which the proxy pays anyway because each listener dials fresh TCP connections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL, crypto

# SSL_MODE_ENABLE_PARTIAL_WRITE; part of OpenSSL's stable ABI, but pyOpenSSL exports no name for it.
_MODE_ENABLE_PARTIAL_WRITE = 0x1

__all__ = [
    "ContextHolder",
    "ContextInfo",
    "build_client_context",
    "build_context_info",
    "certificate_not_after",
    "load_certificates",
    "load_private_key_pem",
    "verify_failure_detail",
]

# X509_V_ERR_* code -> readable reason ("unable to get local issuer certificate"), from pyOpenSSL's
# public table, so failures name what OpenSSL found instead of a bare "certificate verify failed".
_VERIFY_REASONS: dict[int, str] = {
    value: name.removeprefix("ERR_").lower().replace("_", " ")
    for name, value in vars(SSL.X509VerificationCodes).items()
    if name.isupper() and isinstance(value, int)
}


def _record_verify_failure(
    conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    """Verify callback: keep OpenSSL's verdict, remember the first failure on the connection.

    pyOpenSSL exposes no ``SSL_get_verify_result``; this callback is how the reason reaches the
    exception message. The connection's app data is a list owned by :mod:`fastproxy.tls` (a list,
    not the session object, so no reference cycle is created). Runs once per chain certificate
    during the handshake only, never on the data path.
    """
    if not ok:
        slot = conn.get_app_data()
        if isinstance(slot, list) and not slot:
            slot.append((errnum, depth))
    return bool(ok)


def verify_failure_detail(conn: SSL.Connection) -> str | None:
    """The first chain-verification failure recorded on ``conn``, as text, or None."""
    slot = conn.get_app_data()
    if isinstance(slot, list) and slot:
        errnum, depth = slot[0]
        reason = _VERIFY_REASONS.get(errnum, f"X509 verify error {errnum}")
        return f"{reason} (certificate depth {depth})"
    return None


def load_certificates(pems: Sequence[str | bytes]) -> list[x509.Certificate]:
    """Parse PEM certificates; each item may itself hold several concatenated certificates."""
    certs: list[x509.Certificate] = []
    for pem in pems:
        data = pem.encode("ascii") if isinstance(pem, str) else pem
        certs.extend(x509.load_pem_x509_certificates(data))
    if not certs:
        raise ValueError("no certificate found in the PEM input")
    return certs


def load_private_key_pem(pem: bytes) -> RSAPrivateKey:
    """Load an unencrypted RSA private key (PKCS#1 or PKCS#8 PEM) into memory.

    Raises ``ValueError`` for malformed input and ``TypeError`` for a key that is not RSA (AlloyDB
    client keys are RSA 2048, protocol §3.1).
    """
    key = load_pem_private_key(pem, password=None)
    if not isinstance(key, RSAPrivateKey):
        raise TypeError(f"expected an RSA private key, got {type(key).__name__}")
    return key


def certificate_not_after(pem: str | bytes) -> float:
    """NotAfter of the first certificate in ``pem``, in POSIX seconds."""
    return load_certificates([pem])[0].not_valid_after_utc.timestamp()


def build_client_context(
    chain_pems: Sequence[str | bytes],
    private_key: RSAPrivateKey,
    ca_cert_pem: str | bytes,
) -> SSL.Context:
    """Build the immutable client context for one certificate generation.

    ``chain_pems`` is the Admin API's ``pemCertificateChain`` (leaf first); ``ca_cert_pem`` is the
    instance's ``caCert``, which becomes the only trust anchor. Raises ``ValueError`` for unusable
    input and ``OpenSSL.SSL.Error`` when OpenSSL rejects the material (e.g. the key does not match
    the leaf). Treat the result as read-only: hand it to connections, never configure it further.
    """
    chain = load_certificates(chain_pems)
    anchors = load_certificates([ca_cert_pem])

    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    # A memory BIO never refuses a write, so partial writes only cost extra Python calls: without
    # this mode SSL_write encrypts the whole buffer into as many records as needed in one call.
    ctx.clear_mode(_MODE_ENABLE_PARTIAL_WRITE)
    # Free OpenSSL's record buffers (about 32 KiB per connection) whenever they are empty: ten
    # thousand idle connections must not pin 320 MB. Measured cost: about 4% on a 64 KiB burst each
    # way, paid once per burst (one malloc/free pair), not per byte.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)

    ctx.set_verify(SSL.VERIFY_PEER, _record_verify_failure)
    store = ctx.get_cert_store()
    if store is None:  # pragma: no cover - OpenSSL always creates one with the SSL_CTX
        raise ValueError("SSL context has no certificate store")
    for anchor in anchors:
        store.add_cert(crypto.X509.from_cryptography(anchor))
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)

    ctx.use_certificate(chain[0])
    for extra in chain[1:]:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(private_key)
    ctx.check_privatekey()
    return ctx


@dataclass(frozen=True, slots=True)
class ContextInfo:
    """One certificate generation as the loop sees it, read through a single reference.

    ``context`` is the immutable client context; ``generation`` increases with every publication
    (logs and metrics tell generations apart by it); ``expires_at`` is the client certificate's
    NotAfter in POSIX seconds, so a connection can refuse to dial with an expired certificate
    (protocol §3.4: the server would reject it only at the first read).
    """

    context: SSL.Context
    generation: int
    expires_at: float


def build_context_info(
    chain_pems: Sequence[str | bytes],
    private_key: RSAPrivateKey,
    ca_cert_pem: str | bytes,
    generation: int,
) -> ContextInfo:
    """Build a context and package it with its generation and the leaf's expiry."""
    context = build_client_context(chain_pems, private_key, ca_cert_pem)
    expires_at = load_certificates(chain_pems[:1])[0].not_valid_after_utc.timestamp()
    return ContextInfo(context=context, generation=generation, expires_at=expires_at)


class ContextHolder:
    """The publication point between one writer (the refresher) and the loop thread.

    ``publish`` is a single attribute assignment and ``current`` a single attribute read. Under the
    GIL (and under free-threaded CPython, where attribute stores are atomic per object too) a
    reader sees either the old or the new :class:`ContextInfo`, never a mix, and because the info
    is frozen and its context is never mutated, nothing else needs a lock. Connections already in
    flight are unaffected by a publish: each ``SSL.Connection`` captured its ``Context`` when it was
    created (``SSL_new`` takes a reference to the ``SSL_CTX``, pyOpenSSL keeps the Python object),
    so it finishes with the certificate it started with while new connections pick up the new one.

    There is one writer per holder; the generation check in ``publish`` guards against a stale
    build overtaking a newer one, not against concurrent writers.
    """

    __slots__ = ("_info",)

    def __init__(self) -> None:
        self._info: ContextInfo | None = None

    def current(self) -> ContextInfo | None:
        """The latest published generation, or None before the first publication."""
        return self._info

    def next_generation(self) -> int:
        """The generation number the next ``publish`` should carry (writer side)."""
        info = self._info
        return 1 if info is None else info.generation + 1

    def publish(self, info: ContextInfo) -> None:
        """Make ``info`` current. Generations must increase strictly."""
        current = self._info
        if current is not None and info.generation <= current.generation:
            raise ValueError(f"generation {info.generation} is not newer than {current.generation}")
        self._info = info
