"""Certificates for the load test and the static connection-info file fastproxy reads.

One CA signs everything: the upstream's server certificate (SAN = every upstream IP literal)
and one client certificate (RSA-2048, like the AlloyDB connectors' keys). Every peer presents
the same client certificate and trusts only this CA, so all of them pay the same handshake.
Files land in a private temp dir (mode 0700) that the harness removes at exit.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fastproxy.emulator.pki import _ca_key_usage
from fastproxy.emulator.pki import _pem as _pem_cert
from fastproxy.keys import generate_key, public_key_pem

URI_PREFIX = "projects/perf/locations/local/clusters/bench/instances/"


@dataclass(frozen=True)
class CertFiles:
    ca: Path  # CA certificate (PEM)
    server_combined: Path  # server certificate + CA + key, for haproxy's "crt"
    client_cert: Path  # client certificate chain (leaf + CA)
    client_key: Path  # client private key (PKCS#8)
    client_combined: Path  # client chain + key, for haproxy's "crt"
    static_info: Path  # Go Auth Proxy static connection-info JSON


def _pem_key(k: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return k.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _write(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def generate(directory: Path, instances: dict[str, str], server_key: str = "rsa") -> CertFiles:
    """Write the PKI and a static-info file with one entry per ``instances`` name -> IP.

    ``server_key`` is "rsa" (RSA-2048) or "ec" (P-256, a cheaper signature for the upstream).
    """
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(hours=1), now + dt.timedelta(days=2)
    ca_key = generate_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fastproxy perf CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, cn: str, server: bool
    ) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if server:
            sans: list[x509.GeneralName] = [
                x509.IPAddress(ipaddress.ip_address(ip)) for ip in sorted(set(instances.values()))
            ]
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(ca_key, hashes.SHA256())

    skey: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
        ec.generate_private_key(ec.SECP256R1()) if server_key == "ec" else generate_key()
    )
    client_key = generate_key()
    server = leaf(skey, "upstream.perf", server=True)
    client = leaf(client_key, "client.perf", server=False)
    ca_pem = _pem_cert(ca)
    client_chain = _pem_cert(client) + ca_pem
    static: dict[str, object] = {
        "publicKey": public_key_pem(client_key),
        "privateKey": _pem_key(client_key),
    }
    for name, ip in instances.items():
        static[URI_PREFIX + name] = {
            "ipAddress": ip,
            "publicIpAddress": ip,
            "pscInstanceConfig": {},
            "pemCertificateChain": [_pem_cert(client), ca_pem],
            "caCert": ca_pem,
        }
    return CertFiles(
        ca=_write(directory / "ca.pem", ca_pem),
        server_combined=_write(
            directory / "server.pem", _pem_cert(server) + ca_pem + _pem_key(skey)
        ),
        client_cert=_write(directory / "client.pem", client_chain),
        client_key=_write(directory / "client.key", _pem_key(client_key)),
        client_combined=_write(
            directory / "client-combined.pem", client_chain + _pem_key(client_key)
        ),
        static_info=_write(directory / "static.json", json.dumps(static, indent=2)),
    )
