"""Client contexts and their publication: what a context enforces, and that publishing is atomic
for new connections while connections in flight keep the context they started with."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

from fastproxy.tls import TLSClientSession
from fastproxy.tlsctx import (
    ContextHolder,
    ContextInfo,
    build_client_context,
    build_context_info,
    certificate_not_after,
    load_certificates,
    load_private_key_pem,
)
from tests.test_tls import (
    DIAL_IP,
    PyOpenSSLServer,
    Wire,
    client_read_all,
    client_send_all,
    default_pki,
    make_cert,
    make_pyopenssl,
    pem,
    pyopenssl_server_context,
    rsa_key,
    server_read_all,
)


def key_pem(key: object, fmt: serialization.PrivateFormat) -> bytes:
    assert isinstance(key, ec.EllipticCurvePrivateKey | type(default_pki().client_key))
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def test_context_is_tls13_only_with_full_chain() -> None:
    pki = default_pki()
    ctx = pki.client_context()
    session = TLSClientSession(ctx, DIAL_IP)
    assert session.context is ctx
    wire = Wire(session, make_pyopenssl(pki, Path(".")), random.Random(0), 500)
    wire.handshake()
    assert session.version == "TLSv1.3"


def test_context_is_frozen_once_used() -> None:
    """pyOpenSSL >= 26.2 refuses to change a Context a Connection uses: build a new one instead."""
    ctx = default_pki().client_context()
    TLSClientSession(ctx, DIAL_IP)
    with pytest.raises(ValueError, match="cannot be mutated"):
        ctx.set_verify(SSL.VERIFY_NONE)


def test_key_must_match_leaf() -> None:
    pki = default_pki()
    with pytest.raises(SSL.Error):
        build_client_context(pki.client_chain, rsa_key("unrelated"), pem(pki.root))


def test_bad_inputs() -> None:
    pki = default_pki()
    with pytest.raises(ValueError):
        build_client_context([], pki.client_key, pem(pki.root))
    with pytest.raises(ValueError):
        build_client_context(pki.client_chain, pki.client_key, b"not a pem")


def test_chain_items_may_be_str_or_concatenated() -> None:
    pki = default_pki()
    as_text = [p.decode() for p in pki.client_chain]
    assert len(load_certificates(as_text)) == 3
    assert len(load_certificates([b"".join(pki.client_chain)])) == 3
    build_client_context(as_text, pki.client_key, pem(pki.root).decode())


def test_load_private_key_pem() -> None:
    key = default_pki().client_key
    for fmt in (serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8):
        loaded = load_private_key_pem(key_pem(key, fmt))
        assert loaded.private_numbers() == key.private_numbers()
    ec_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(TypeError, match="RSA"):
        load_private_key_pem(key_pem(ec_key, serialization.PrivateFormat.PKCS8))
    with pytest.raises(ValueError):
        load_private_key_pem(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")


def test_build_context_info_carries_leaf_expiry() -> None:
    pki = default_pki()
    info = build_context_info(pki.client_chain, pki.client_key, pem(pki.root), generation=7)
    assert info.generation == 7
    assert info.expires_at == pki.client_cert.not_valid_after_utc.timestamp()
    assert info.expires_at == certificate_not_after(pki.client_chain[0])
    with pytest.raises(AttributeError):
        info.generation = 8  # type: ignore[misc]


def test_non_self_signed_anchor() -> None:
    """The CA we are given anchors the chain even when it is an intermediate (PARTIAL_CHAIN)."""
    pki = default_pki()
    server_ca_key = rsa_key("server-ca")
    server_ca = make_cert("server CA", server_ca_key, (pki.root, pki.root_key), ca=True)
    server_cert = make_cert("s", pki.server_key, (server_ca, server_ca_key), sans=[DIAL_IP])
    server_pki = pki._replace_server(server_cert)
    ctx = build_client_context(pki.client_chain, pki.client_key, pem(server_ca))
    client = TLSClientSession(ctx, DIAL_IP)
    server = PyOpenSSLServer(pyopenssl_server_context(server_pki))
    wire = Wire(client, server, random.Random(0), 700)
    wire.handshake()
    assert client.handshake_done


def test_holder_publish_and_current() -> None:
    pki = default_pki()
    holder = ContextHolder()
    assert holder.current() is None
    assert holder.next_generation() == 1
    first = build_context_info(pki.client_chain, pki.client_key, pem(pki.root), 1)
    holder.publish(first)
    assert holder.current() is first
    assert holder.next_generation() == 2
    with pytest.raises(ValueError, match="not newer"):
        holder.publish(ContextInfo(first.context, 1, first.expires_at))
    second = ContextInfo(pki.client_context(), 2, first.expires_at)
    holder.publish(second)
    assert holder.current() is second


def test_session_keeps_its_context_after_publish() -> None:
    """A connection that started before a refresh finishes with the old certificate."""
    pki = default_pki()
    ca_key = rsa_key("main-client-ca")
    holder = ContextHolder()
    old = build_context_info(pki.client_chain, pki.client_key, pem(pki.root), 1)
    holder.publish(old)

    info = holder.current()
    assert info is not None
    in_flight = TLSClientSession(info.context, DIAL_IP)
    assert not in_flight.do_handshake()  # ClientHello queued under generation 1

    # The refresher publishes generation 2: a new leaf for the same key.
    new_leaf = make_cert("client-gen2", pki.client_key, (pki.client_ca, ca_key), client=True)
    chain2 = [pem(new_leaf), pem(pki.client_ca), pem(pki.root)]
    holder.publish(build_context_info(chain2, pki.client_key, pem(pki.root), 2))

    assert in_flight.context is old.context
    server = PyOpenSSLServer(pyopenssl_server_context(pki))
    wire = Wire(in_flight, server, random.Random(3), 300)
    wire.handshake()
    presented = server.conn.get_peer_certificate(as_cryptography=True)
    assert presented is not None and presented.serial_number == pki.client_cert.serial_number
    client_send_all(wire, b"still generation 1")
    wire.flush()
    assert server_read_all(server)[0] == b"still generation 1"

    current = holder.current()
    assert current is not None and current.generation == 2
    fresh = TLSClientSession(current.context, DIAL_IP)
    server2 = PyOpenSSLServer(pyopenssl_server_context(pki))
    wire2 = Wire(fresh, server2, random.Random(4), 300)
    wire2.handshake()
    presented = server2.conn.get_peer_certificate(as_cryptography=True)
    assert presented is not None and presented.serial_number == new_leaf.serial_number
    server2.write(b"hi")
    wire2.flush()
    assert client_read_all(fresh, memoryview(bytearray(10)))[0] == b"hi"
