"""The emulator's certificate authority: one root and one client CA per AlloyDB cluster.

Shape (protocol.md §3.2, §7.3 items 4, 5, 7, 8), per cluster:

* **root** (``CN=root.alloydb``) — self-signed. It is the ``caCert`` clients trust for the server
  certificate, it signs the server certificates, and it is the only trust anchor the server side
  uses for client certificates. Because it is per cluster, a client certificate issued for cluster
  A fails at cluster B, as on the real service.
* **client CA** (``CN=client.alloydb``, ``pathlen:0``) — signed by the root; signs every client
  certificate. Clients send ``[leaf, client CA, root]`` in the handshake.

Rotation (``PKI.rotate``) replaces both with fresh keys and bumps the cluster's ``generation``;
server credentials are cached per (instance, generation), so the server side picks up the new CA
on its next lookup while clients holding the old ``caCert`` fail verification — which is exactly
the situation a proxy's refresh logic has to survive.

RSA-2048 key generation costs tens of milliseconds, so everything is created lazily on first
use and cached. Keys exist only in memory; nothing is ever written to disk.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import math
import secrets
import threading
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fastproxy.emulator.state import Instance

KEY_SIZE = 2048
PUBLIC_EXPONENT = 65537
# Client keys: the connectors send RSA-2048; anything weaker is refused (policy choice, §7.3 #3),
# anything absurdly large is refused too so a request cannot make the signer crawl.
MIN_CLIENT_KEY_BITS = 2048
MAX_CLIENT_KEY_BITS = 16384
CA_VALIDITY = dt.timedelta(days=3650)
# Back-dating tolerates clock skew between the emulator and whoever verifies its certificates.
CA_BACKDATE = dt.timedelta(days=1)
LEAF_BACKDATE_S = 60
# X.509 upper bound for CN/OU (RFC 5280 ub-common-name); cryptography enforces it for CN.
_NAME_MAX = 64

_SHA256 = hashes.SHA256()


def _leaf_key_usage(*, key_encipherment: bool) -> x509.KeyUsage:
    """KeyUsage of a leaf: signing always; key encipherment only for server certificates."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


class PKIError(ValueError):
    """A request the CA refuses (bad public key, bad lifetime); the Admin API answers 400."""


@dataclass(frozen=True)
class ClientCertificate:
    """A signed client certificate as the Admin API hands it out."""

    chain_pems: list[str]  # [leaf, client CA, root], each ending with "\n"
    ca_cert_pem: str  # the cluster root: trust anchor for the server certificate
    serial: int
    not_after: float  # POSIX seconds (whole seconds: X.509 times have no fraction)


@dataclass(frozen=True)
class ServerCredentials:
    """What the server side of one instance needs to build its TLS context."""

    cert_chain_pem: bytes  # server leaf + cluster root
    key_pem: bytes  # PKCS#8, unencrypted; in memory only
    client_ca_pem: bytes  # the cluster root: the only anchor for client certificates
    generation: int  # the cluster CA generation these were issued under


def _pem(cert: x509.Certificate) -> str:
    # public_bytes(PEM) always ends with "\n"; the Python connector concatenates the chain
    # without separators (protocol.md §2.3), so that newline matters.
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=KEY_SIZE)


def _ou_for(cluster_parent: str) -> str:
    """A per-cluster OU so that different clusters' CAs never share a subject name.

    OpenSSL looks issuers up by name; distinct names keep a mix-up from even looking plausible.
    """
    if len(cluster_parent) <= _NAME_MAX:
        return cluster_parent
    digest = hashlib.sha256(cluster_parent.encode()).hexdigest()[:12]
    cluster = cluster_parent.rsplit("/", 1)[-1]
    return f"{cluster[: _NAME_MAX - len(digest) - 1]}-{digest}"


def _ca_name(cn: str, cluster_parent: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fastproxy AlloyDB emulator"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _ou_for(cluster_parent)),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


class ClusterCA:
    """Root and client CA of one cluster, generation ``generation``."""

    def __init__(self, cluster_parent: str, generation: int) -> None:
        self.cluster_parent = cluster_parent
        self.generation = generation
        now = dt.datetime.now(dt.UTC)
        self.not_before = now - CA_BACKDATE
        self.not_after = now + CA_VALIDITY

        self.root_key = _new_key()
        root_name = _ca_name("root.alloydb", cluster_parent)
        root_pub = self.root_key.public_key()
        self.root_cert = (
            x509.CertificateBuilder()
            .subject_name(root_name)
            .issuer_name(root_name)
            .public_key(root_pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.not_before)
            .not_valid_after(self.not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_pub), critical=False)
            .sign(self.root_key, _SHA256)
        )

        self.intermediate_key = _new_key()
        int_pub = self.intermediate_key.public_key()
        self.intermediate_cert = (
            x509.CertificateBuilder()
            .subject_name(_ca_name("client.alloydb", cluster_parent))
            .issuer_name(root_name)
            .public_key(int_pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.not_before)
            .not_valid_after(self.not_after)
            # pathlen 0: the client CA signs leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(int_pub), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root_pub), critical=False
            )
            .sign(self.root_key, _SHA256)
        )
        self.root_pem = _pem(self.root_cert)
        self.intermediate_pem = _pem(self.intermediate_cert)


def _load_client_public_key(public_key_pem: str) -> rsa.RSAPublicKey:
    """Parse PKCS#1 (``RSA PUBLIC KEY``, Go) or SPKI (``PUBLIC KEY``, Python) PEM."""
    if not isinstance(public_key_pem, str) or not public_key_pem.strip():
        raise PKIError("publicKey is empty")
    text = public_key_pem.strip()
    if not (
        text.startswith("-----BEGIN RSA PUBLIC KEY-----")
        or text.startswith("-----BEGIN PUBLIC KEY-----")
    ):
        raise PKIError(
            "publicKey must be a PEM 'RSA PUBLIC KEY' (PKCS#1) or 'PUBLIC KEY' (SPKI) block"
        )
    try:
        key = serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise PKIError(f"publicKey is not a valid PEM public key: {exc}") from exc
    except Exception as exc:  # cryptography may raise its own types for odd DER
        raise PKIError(f"publicKey could not be parsed: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise PKIError(f"publicKey must be an RSA key, got {type(key).__name__}")
    if not MIN_CLIENT_KEY_BITS <= key.key_size <= MAX_CLIENT_KEY_BITS:
        raise PKIError(
            f"publicKey must be an RSA key of {MIN_CLIENT_KEY_BITS} to {MAX_CLIENT_KEY_BITS} "
            f"bits, got {key.key_size}"
        )
    return key


def _principal_san(principal: str) -> x509.SubjectAlternativeName | None:
    """An e-mail SAN naming the principal, when it looks like one.

    Not needed by any connector; it lets strict RFC 5280 verifiers (cryptography's client
    verifier requires a SAN) accept the leaf, and tells a human whose certificate it is.
    """
    local, at, domain = principal.partition("@")
    if not (at and local and domain) or not principal.isascii():
        return None
    try:
        return x509.SubjectAlternativeName([x509.RFC822Name(principal)])
    except ValueError:
        return None


class PKI:
    """All cluster CAs of one emulator, their client certificates and server credentials.

    Thread-safe with a single lock: the Admin API calls it from HTTP worker threads and the
    server side from its loop. Lazy key generation happens under the lock, so two concurrent
    first requests for one cluster never produce two different CAs.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._cas: dict[str, ClusterCA] = {}
        # Survives rotation before first use, so generations only ever go up.
        self._generations: dict[str, int] = {}
        self._server: dict[tuple[str, int], ServerCredentials] = {}
        self._serials: set[int] = set()

    # --- cluster CAs ---------------------------------------------------------------------
    def ca_for(self, cluster_parent: str) -> ClusterCA:
        """The cluster's current CA, created on first use."""
        with self._lock:
            ca = self._cas.get(cluster_parent)
            if ca is None:
                generation = self._generations.get(cluster_parent, 0) + 1
                ca = ClusterCA(cluster_parent, generation)
                self._cas[cluster_parent] = ca
                self._generations[cluster_parent] = generation
            return ca

    def rotate(self, cluster_parent: str) -> None:
        """Replace the cluster's CA with a fresh one (generation + 1).

        Certificates already issued stay valid cryptographically but no longer chain to the
        anchors the server side uses; clients must fetch new ones.
        """
        with self._lock:
            old = self._cas.pop(cluster_parent, None)
            if old is not None:
                self._generations[cluster_parent] = old.generation
                # Drop server credentials issued under the old CA: they can never be used again.
                stale = old.root_pem.encode("ascii")
                for key in [k for k, v in self._server.items() if v.client_ca_pem == stale]:
                    del self._server[key]
            self.ca_for(cluster_parent)

    def generation(self, cluster_parent: str) -> int:
        """The cluster's current CA generation (creating the CA if needed)."""
        return self.ca_for(cluster_parent).generation

    def known_clusters(self) -> list[str]:
        with self._lock:
            return sorted(self._cas)

    # --- client certificates -------------------------------------------------------------
    def _new_serial(self) -> int:
        # 64 random bits, top bit forced so every serial has the same size, never 0 or negative;
        # remembered so no two certificates of this emulator share one (the server side maps
        # serials back to IssuedCert records).
        while True:
            serial = secrets.randbits(64) | (1 << 63)
            if serial not in self._serials:
                self._serials.add(serial)
                return serial

    def sign_client_certificate(
        self,
        cluster_parent: str,
        public_key_pem: str,
        lifetime_s: float,
        use_metadata_exchange: bool,
        principal: str,
    ) -> ClientCertificate:
        """Sign a client certificate for ``public_key_pem`` with the cluster's client CA.

        ``use_metadata_exchange`` is not encoded in the certificate; the caller records it
        (``EmulatorState.record_issued``) keyed by the returned serial.
        """
        del use_metadata_exchange  # recorded by the caller, see docstring
        if not (isinstance(lifetime_s, (int, float)) and math.isfinite(lifetime_s)):
            raise PKIError(f"certificate lifetime must be a finite number, got {lifetime_s!r}")
        if lifetime_s <= 0:
            raise PKIError(f"certificate lifetime must be positive, got {lifetime_s}")
        public_key = _load_client_public_key(public_key_pem)
        now = time.time()
        not_before = dt.datetime.fromtimestamp(int(now) - LEAF_BACKDATE_S, dt.UTC)
        # X.509 times have whole seconds; round down so the reported value equals the encoded one.
        not_after_s = int(now + lifetime_s)
        not_after = dt.datetime.fromtimestamp(not_after_s, dt.UTC)
        subject = (
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, principal[:_NAME_MAX])])
            if principal
            else x509.Name([])
        )
        with self._lock:
            ca = self.ca_for(cluster_parent)
            serial = self._new_serial()
        leaf = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca.intermediate_cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(key_encipherment=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca.intermediate_key.public_key()
                ),
                critical=False,
            )
        )
        san = _principal_san(principal)
        if san is not None:
            leaf = leaf.add_extension(san, critical=False)
        cert = leaf.sign(ca.intermediate_key, _SHA256)
        return ClientCertificate(
            chain_pems=[_pem(cert), ca.intermediate_pem, ca.root_pem],
            ca_cert_pem=ca.root_pem,
            serial=serial,
            not_after=float(not_after_s),
        )

    # --- server credentials --------------------------------------------------------------
    def server_credentials(self, instance: Instance) -> ServerCredentials:
        """The instance's server certificate and key under its cluster's current CA.

        Cached per (instance URI, generation): cheap to call on every accepted connection, and
        a rotation is noticed by comparing ``generation``.
        """
        cluster_parent = instance.name.cluster_parent
        with self._lock:
            ca = self.ca_for(cluster_parent)
            key = (instance.name.uri, ca.generation)
            creds = self._server.get(key)
            if creds is None:
                creds = self._issue_server(instance, ca)
                self._server[key] = creds
            return creds

    @staticmethod
    def _issue_server(instance: Instance, ca: ClusterCA) -> ServerCredentials:
        """Server leaf: CN ``<uid>.server.alloydb`` (pre-v1.3.0 Go clients checked it, §3.5)
        and SANs for every address a client may dial (current clients check those, §3.3)."""
        key = _new_key()
        pub = key.public_key()
        sans: list[x509.GeneralName] = []
        for ip in (instance.ip_address, instance.public_ip_address):
            if ip:
                sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        if instance.psc_dns_name:
            # The API reports the PSC name with a trailing dot; SANs carry it without (§3.3).
            dns = instance.psc_dns_name.rstrip(".")
            if dns:
                sans.append(x509.DNSName(dns))
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(
                            NameOID.COMMON_NAME, f"{instance.instance_uid}.server.alloydb"
                        )
                    ]
                )
            )
            .issuer_name(ca.root_cert.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(ca.not_before)
            .not_valid_after(ca.not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(key_encipherment=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.root_key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca.root_key, _SHA256)
        root_pem = ca.root_pem.encode("ascii")
        return ServerCredentials(
            cert_chain_pem=_pem(cert).encode("ascii") + root_pem,
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            client_ca_pem=root_pem,
            generation=ca.generation,
        )


def serial_of_der(der: bytes) -> int:
    """Serial number of a DER certificate (the server side maps it to an ``IssuedCert``)."""
    return x509.load_der_x509_certificate(der).serial_number


def serial_of_pem(pem: str | bytes) -> int:
    """Serial number of a PEM certificate (tests read it from the Admin API's chain)."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificate(data).serial_number
