"""The client key and the certificate facts derived from it (fastproxy.keys)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from fastproxy.keys import (
    certificate_has_public_key,
    generate_key,
    leaf_not_after,
    public_key_pem,
    spki_der,
)


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return generate_key()


def _cert_for(public: rsa.RSAPublicKey, not_after: dt.datetime) -> x509.Certificate:
    signer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(1)
        .not_valid_before(not_after - dt.timedelta(hours=2))
        .not_valid_after(not_after)
        .sign(signer, hashes.SHA256())
    )


def test_generated_key_is_rsa_2048_with_f4(key: rsa.RSAPrivateKey) -> None:
    assert key.key_size == 2048
    assert key.public_key().public_numbers().e == 65537


def test_public_key_pem_is_spki(key: rsa.RSAPrivateKey) -> None:
    pem = public_key_pem(key)
    assert pem.startswith("-----BEGIN PUBLIC KEY-----\n")
    assert pem.rstrip().endswith("-----END PUBLIC KEY-----")
    loaded = serialization.load_pem_public_key(pem.encode())
    assert isinstance(loaded, rsa.RSAPublicKey)
    assert loaded.public_numbers() == key.public_key().public_numbers()


def test_spki_der_is_the_same_for_pkcs1_and_spki(key: rsa.RSAPrivateKey) -> None:
    pkcs1 = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
    )
    assert b"RSA PUBLIC KEY" in pkcs1
    assert spki_der(pkcs1) == spki_der(public_key_pem(key))


def test_spki_der_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        spki_der("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")


def test_certificate_has_public_key(key: rsa.RSAPrivateKey) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    ours = _cert_for(key.public_key(), later)
    other = _cert_for(rsa.generate_private_key(65537, 2048).public_key(), later)
    assert certificate_has_public_key(ours, public_key_pem(key))
    assert not certificate_has_public_key(other, public_key_pem(key))


def test_leaf_not_after_reads_the_first_certificate(key: rsa.RSAPrivateKey) -> None:
    leaf_end = dt.datetime(2031, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    leaf = _cert_for(key.public_key(), leaf_end)
    root = _cert_for(key.public_key(), leaf_end + dt.timedelta(days=300))
    pems = [c.public_bytes(serialization.Encoding.PEM).decode() for c in (leaf, root)]
    assert leaf_not_after(pems) == leaf_end.timestamp()


def test_leaf_not_after_rejects_empty_and_bad_chains() -> None:
    with pytest.raises(ValueError):
        leaf_not_after([])
    with pytest.raises(ValueError):
        leaf_not_after(["not a certificate"])


def test_key_repr_does_not_leak_material(key: rsa.RSAPrivateKey) -> None:
    text = repr(key)
    assert "PRIVATE" not in text
    assert str(key.private_numbers().d) not in text
