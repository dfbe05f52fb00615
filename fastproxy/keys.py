"""The client's RSA key pair and the certificate facts that depend on it (protocol.md §3.1-3.2).

One RSA-2048 key (e = 65537) per process, shared by every instance and reused across refreshes,
as the connectors do: the Admin API signs a fresh short-lived certificate for the same public key
each time, so nothing is gained by rotating the key, and generating one costs tens of
milliseconds of CPU.

Where things happen and why:

* ``generate_key`` runs once, on the refresher thread, never on the event loop: key generation is
  CPU-bound and would stall every connection for its duration.
* The public key goes to ``generateClientCertificate`` as SPKI PEM (``-----BEGIN PUBLIC
  KEY-----``), the form the Python connectors send; the API accepts SPKI and PKCS#1.
* The private key stays in memory. Nothing here serialises it, writes it to disk or logs it; the
  TLS context takes the key object itself (:mod:`fastproxy.tlsctx`). The cryptography key object's
  ``repr`` shows only its type and address, so an accidental ``%r`` in a log line leaks nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fastproxy.tlsctx import certificate_not_after

__all__ = [
    "KEY_BITS",
    "PUBLIC_EXPONENT",
    "certificate_has_public_key",
    "generate_key",
    "leaf_not_after",
    "public_key_pem",
    "spki_der",
]

#: AlloyDB client keys are RSA 2048 (both connectors; protocol.md §3.1).
KEY_BITS: Final = 2048
#: The standard RSA public exponent, as the connectors use.
PUBLIC_EXPONENT: Final = 65537


def generate_key() -> rsa.RSAPrivateKey:
    """Generate the process's RSA-2048 client key.

    Called once per process, on the refresher thread (never on the loop: it takes tens of
    milliseconds of CPU). The key lives only in memory.
    """
    return rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=KEY_BITS)


def public_key_pem(key: rsa.RSAPrivateKey) -> str:
    """The public half of ``key`` as SPKI PEM text, the ``publicKey`` of the certificate request."""
    return (
        key.public_key()
        .public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        .decode("ascii")
    )


def spki_der(public_pem: str | bytes) -> bytes:
    """DER SubjectPublicKeyInfo of a PEM public key (SPKI or PKCS#1), for exact comparison.

    Raises ``ValueError`` if the text is not a PEM public key.
    """
    data = public_pem.encode("ascii") if isinstance(public_pem, str) else public_pem
    key = serialization.load_pem_public_key(data)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def certificate_has_public_key(cert: x509.Certificate, public_pem: str | bytes) -> bool:
    """True if ``cert`` certifies exactly the public key ``public_pem``.

    A certificate for some other key would make every handshake fail with an opaque "key values
    mismatch" deep inside OpenSSL; checking here turns that into a clear refresh error.
    """
    ours = spki_der(public_pem)
    theirs = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return ours == theirs


def leaf_not_after(chain_pems: Sequence[str]) -> float:
    """NotAfter of the chain's first certificate (the client leaf), in POSIX seconds.

    This is when the certificate, and so the current TLS context, stops being usable; the
    refresh schedule is computed from it (protocol.md §3.2). Raises ``ValueError`` for an empty
    chain or unparsable PEM.
    """
    if not chain_pems:
        raise ValueError("empty certificate chain")
    return certificate_not_after(chain_pems[0])
