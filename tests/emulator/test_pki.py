"""The emulator's CA: chain shape, extensions, key formats, server credentials and rotation.

Checks go through cryptography's RFC 5280 verifier and a real TLS 1.3 handshake over a socket
pair with the standard library's ``ssl``, so "valid" means what a TLS stack thinks, not what
this module's own code thinks.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from fastproxy.emulator.pki import PKI, PKIError, serial_of_der, serial_of_pem
from fastproxy.emulator.state import Instance, InstanceName

CLUSTER_A = "projects/p/locations/us-central1/clusters/a"
CLUSTER_B = "projects/google.com:p/locations/us-central1/clusters/b"
PSC = "abc.def.us-central1.alloydb-psc.goog."
PRINCIPAL = "alice@example.com"


@pytest.fixture(scope="module")
def client_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def spki_pem(client_key: rsa.RSAPrivateKey) -> str:
    return (
        client_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def pkcs1_pem(client_key: rsa.RSAPrivateKey) -> str:
    return (
        client_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        .decode()
    )


@pytest.fixture(scope="module")
def pki() -> PKI:
    """Shared by tests that do not rotate: CA generation is the slow part."""
    return PKI()


@pytest.fixture(scope="module")
def instance_a() -> Instance:
    return Instance(
        name=InstanceName.parse(f"{CLUSTER_A}/instances/i1"),
        instance_uid="0f6b6c1e-6d1f-4c1c-9d1a-3c2b9e0a7f11",
        ip_address="127.0.0.2",
        public_ip_address="127.0.0.3",
        psc_dns_name=PSC,
    )


def rsa_numbers(key: object) -> rsa.RSAPublicNumbers:
    assert isinstance(key, rsa.RSAPublicKey)
    return key.public_numbers()


def load_chain(pems: list[str]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(p.encode()) for p in pems]


def utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


# --- client certificates -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["spki", "pkcs1"])
def test_both_public_key_formats_are_accepted(
    pki: PKI, fmt: str, spki_pem: str, pkcs1_pem: str, client_key: rsa.RSAPrivateKey
) -> None:
    pem = spki_pem if fmt == "spki" else pkcs1_pem
    cc = pki.sign_client_certificate(CLUSTER_A, pem, 3600, True, PRINCIPAL)
    leaf = load_chain(cc.chain_pems)[0]
    assert rsa_numbers(leaf.public_key()) == client_key.public_key().public_numbers()


def test_chain_order_newlines_and_signatures(pki: PKI, spki_pem: str) -> None:
    cc = pki.sign_client_certificate(CLUSTER_A, spki_pem, 3600, True, PRINCIPAL)
    assert len(cc.chain_pems) == 3
    for pem in cc.chain_pems:
        assert pem.startswith("-----BEGIN CERTIFICATE-----\n")
        assert pem.endswith("-----END CERTIFICATE-----\n")
    # The Python connector joins the chain without separators: it must still parse as three.
    assert len(x509.load_pem_x509_certificates("".join(cc.chain_pems).encode())) == 3
    assert cc.chain_pems[2] == cc.ca_cert_pem
    leaf, intermediate, root = load_chain(cc.chain_pems)
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)
    assert intermediate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "client.alloydb"
    )
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "root.alloydb"


def test_chain_passes_an_rfc5280_client_verifier(pki: PKI, spki_pem: str) -> None:
    cc = pki.sign_client_certificate(CLUSTER_A, spki_pem, 3600, False, PRINCIPAL)
    leaf, intermediate, root = load_chain(cc.chain_pems)
    verifier = PolicyBuilder().store(Store([root])).build_client_verifier()
    verified = verifier.verify(leaf, [intermediate])
    assert verified.chain[-1] == root


def test_leaf_extensions_and_validity(pki: PKI, spki_pem: str) -> None:
    before = time.time()
    cc = pki.sign_client_certificate(CLUSTER_A, spki_pem, 3600, True, PRINCIPAL)
    leaf = load_chain(cc.chain_pems)[0]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert leaf.not_valid_before_utc <= utc(before - 59)
    assert leaf.not_valid_before_utc >= utc(before - 62)
    assert leaf.not_valid_after_utc == utc(cc.not_after)
    assert before + 3598 <= cc.not_after <= time.time() + 3600
    assert 0 < cc.serial < 2**64 and leaf.serial_number == cc.serial


def test_short_lifetime(pki: PKI, pkcs1_pem: str) -> None:
    now = time.time()
    cc = pki.sign_client_certificate(CLUSTER_A, pkcs1_pem, 10, True, PRINCIPAL)
    assert now + 8 <= cc.not_after <= now + 11


def test_serials_are_unique_and_parseable(pki: PKI, spki_pem: str) -> None:
    serials = set()
    for _ in range(20):
        cc = pki.sign_client_certificate(CLUSTER_A, spki_pem, 3600, True, "")
        der = load_chain(cc.chain_pems)[0].public_bytes(serialization.Encoding.DER)
        assert serial_of_der(der) == cc.serial == serial_of_pem(cc.chain_pems[0])
        serials.add(cc.serial)
    assert len(serials) == 20


def test_empty_principal_gives_empty_subject(pki: PKI, spki_pem: str) -> None:
    cc = pki.sign_client_certificate(CLUSTER_A, spki_pem, 3600, True, "")
    assert len(load_chain(cc.chain_pems)[0].subject) == 0


def _pem_of(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.mark.parametrize(
    "case",
    ["rsa1024", "ec", "garbage", "empty", "bad-base64", "private-key", "certificate"],
)
def test_bad_public_keys_are_rejected(pki: PKI, case: str, spki_pem: str) -> None:
    if case == "rsa1024":
        pem = _pem_of(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    elif case == "ec":
        pem = _pem_of(ec.generate_private_key(ec.SECP256R1()))
    elif case == "garbage":
        pem = "hello"
    elif case == "empty":
        pem = ""
    elif case == "bad-base64":
        pem = "-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n"
    elif case == "private-key":
        pem = (
            ec.generate_private_key(ec.SECP256R1())
            .private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            .decode()
        )
    else:
        pem = pki.sign_client_certificate(CLUSTER_A, spki_pem, 3600, True, "").chain_pems[0]
    with pytest.raises(PKIError) as info:
        pki.sign_client_certificate(CLUSTER_A, pem, 3600, True, PRINCIPAL)
    assert isinstance(info.value, ValueError)
    assert "publicKey" in str(info.value)


@pytest.mark.parametrize("lifetime", [0, -5, float("nan"), float("inf")])
def test_bad_lifetimes_are_rejected(pki: PKI, spki_pem: str, lifetime: float) -> None:
    with pytest.raises(PKIError):
        pki.sign_client_certificate(CLUSTER_A, spki_pem, lifetime, True, PRINCIPAL)


# --- cluster CAs -------------------------------------------------------------------------


def test_root_and_intermediate_shape(pki: PKI) -> None:
    ca = pki.ca_for(CLUSTER_A)
    now = dt.datetime.now(dt.UTC)
    root, inter = ca.root_cert, ca.intermediate_cert
    assert root.subject == root.issuer
    assert CLUSTER_A in root.subject.rfc4514_string()
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert now - dt.timedelta(hours=25) < root.not_valid_before_utc < now - dt.timedelta(hours=23)
    assert root.not_valid_after_utc > now + dt.timedelta(days=3600)
    ibc = inter.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ibc.ca and ibc.path_length == 0
    assert inter.issuer == root.subject
    assert isinstance(root.public_key(), rsa.RSAPublicKey)
    assert rsa_numbers(root.public_key()).n.bit_length() == 2048


def test_clusters_have_distinct_cas(pki: PKI, spki_pem: str) -> None:
    a, b = pki.ca_for(CLUSTER_A), pki.ca_for(CLUSTER_B)
    assert a is pki.ca_for(CLUSTER_A)
    assert a.root_pem != b.root_pem
    assert a.root_cert.subject != b.root_cert.subject
    # A certificate issued for cluster A does not chain to cluster B's root.
    cc = pki.sign_client_certificate(CLUSTER_A, spki_pem, 3600, True, PRINCIPAL)
    leaf, inter, _ = load_chain(cc.chain_pems)
    verifier = PolicyBuilder().store(Store([b.root_cert])).build_client_verifier()
    with pytest.raises(Exception, match=r"(?i)issuer|candidate"):
        verifier.verify(leaf, [inter])


def test_concurrent_first_use_creates_one_ca() -> None:
    fresh = PKI()
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(fresh.ca_for(CLUSTER_A))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(r) for r in results}) == 1


def test_rotate_replaces_root_and_bumps_generation(spki_pem: str, instance_a: Instance) -> None:
    fresh = PKI()
    ca1 = fresh.ca_for(CLUSTER_A)
    other = fresh.ca_for(CLUSTER_B)
    creds1 = fresh.server_credentials(instance_a)
    assert creds1.generation == ca1.generation == 1
    fresh.rotate(CLUSTER_A)
    ca2 = fresh.ca_for(CLUSTER_A)
    assert ca2.generation == 2 and ca2.root_pem != ca1.root_pem
    assert fresh.ca_for(CLUSTER_B) is other  # other clusters untouched
    creds2 = fresh.server_credentials(instance_a)
    assert creds2.generation == 2
    assert creds2.client_ca_pem == ca2.root_pem.encode()
    assert creds2.key_pem != creds1.key_pem
    cc = fresh.sign_client_certificate(CLUSTER_A, spki_pem, 3600, True, PRINCIPAL)
    assert cc.ca_cert_pem == ca2.root_pem
    # Rotating a cluster never seen before still yields a usable CA, generation going up.
    fresh.rotate("projects/x/locations/r/clusters/new")
    assert fresh.generation("projects/x/locations/r/clusters/new") == 1


# --- server credentials ------------------------------------------------------------------


def test_server_certificate_shape(pki: PKI, instance_a: Instance) -> None:
    creds = pki.server_credentials(instance_a)
    assert pki.server_credentials(instance_a) is creds  # cached
    leaf, root = x509.load_pem_x509_certificates(creds.cert_chain_pem)
    assert creds.client_ca_pem == root.public_bytes(serialization.Encoding.PEM)
    assert root.subject == pki.ca_for(CLUSTER_A).root_cert.subject
    leaf.verify_directly_issued_by(root)
    cn = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == f"{instance_a.instance_uid}.server.alloydb"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.2"),
        ipaddress.ip_address("127.0.0.3"),
    ]
    assert san.get_values_for_type(x509.DNSName) == [PSC.rstrip(".")]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment
    assert creds.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    key = serialization.load_pem_private_key(creds.key_pem, password=None)
    assert rsa_numbers(key.public_key()) == rsa_numbers(leaf.public_key())

    store = Store([root])
    for name in (
        x509.IPAddress(ipaddress.ip_address("127.0.0.2")),
        x509.IPAddress(ipaddress.ip_address("127.0.0.3")),
        x509.DNSName(PSC.rstrip(".")),
    ):
        PolicyBuilder().store(store).build_server_verifier(name).verify(leaf, [])


def test_server_certificate_with_private_ip_only(pki: PKI) -> None:
    inst = Instance(
        name=InstanceName.parse(f"{CLUSTER_A}/instances/private-only"),
        instance_uid="uid-private",
        ip_address="127.0.0.4",
        public_ip_address=None,
        psc_dns_name=None,
    )
    leaf = x509.load_pem_x509_certificates(pki.server_credentials(inst).cert_chain_pem)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.IPAddress(ipaddress.ip_address("127.0.0.4"))]


def _handshake(
    tmp_path: Path,
    server_chain: bytes,
    server_key: bytes,
    server_client_ca: bytes,
    client_chain: list[str],
    client_key: rsa.RSAPrivateKey,
    client_ca: str,
    server_hostname: str,
) -> tuple[bytes, BaseException | None]:
    """TLS 1.3 mutual auth over a socket pair; returns what the client read and the
    server's error, if any."""
    (tmp_path / "s.pem").write_bytes(server_chain)
    (tmp_path / "s.key").write_bytes(server_key)
    (tmp_path / "c.pem").write_text("".join(client_chain))
    (tmp_path / "c.key").write_bytes(
        client_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sctx.load_cert_chain(str(tmp_path / "s.pem"), str(tmp_path / "s.key"))
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.load_verify_locations(cadata=server_client_ca.decode())
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.minimum_version = ssl.TLSVersion.TLSv1_3
    cctx.load_verify_locations(cadata=client_ca)
    cctx.load_cert_chain(str(tmp_path / "c.pem"), str(tmp_path / "c.key"))

    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    server_error: list[BaseException] = []

    def serve() -> None:
        try:
            with sctx.wrap_socket(b, server_side=True) as s:
                s.sendall(b"hello")
        except BaseException as exc:
            server_error.append(exc)
            b.close()

    t = threading.Thread(target=serve)
    t.start()
    got = b""
    try:
        with cctx.wrap_socket(a, server_hostname=server_hostname) as c:
            got = c.recv(5)
    except (ssl.SSLError, OSError):
        pass
    t.join()
    return got, server_error[0] if server_error else None


def test_tls13_mutual_handshake(
    tmp_path: Path, pki: PKI, instance_a: Instance, spki_pem: str, client_key: rsa.RSAPrivateKey
) -> None:
    creds = pki.server_credentials(instance_a)
    cc = pki.sign_client_certificate(CLUSTER_A, spki_pem, 3600, True, PRINCIPAL)
    for host in ("127.0.0.2", "127.0.0.3", PSC.rstrip(".")):
        got, err = _handshake(
            tmp_path,
            creds.cert_chain_pem,
            creds.key_pem,
            creds.client_ca_pem,
            cc.chain_pems,
            client_key,
            cc.ca_cert_pem,
            host,
        )
        assert err is None and got == b"hello", host


def test_tls_rejects_client_cert_of_another_cluster(
    tmp_path: Path, pki: PKI, instance_a: Instance, spki_pem: str, client_key: rsa.RSAPrivateKey
) -> None:
    creds = pki.server_credentials(instance_a)
    wrong = pki.sign_client_certificate(CLUSTER_B, spki_pem, 3600, True, PRINCIPAL)
    got, err = _handshake(
        tmp_path,
        creds.cert_chain_pem,
        creds.key_pem,
        creds.client_ca_pem,
        wrong.chain_pems,
        client_key,
        pki.ca_for(CLUSTER_A).root_pem,
        "127.0.0.2",
    )
    assert got == b""
    assert isinstance(err, ssl.SSLError)
