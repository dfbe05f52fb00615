"""An AlloyDB client written for the tests with the standard library's ``ssl`` and ``requests``.

It deliberately shares no code with fastproxy (nor with the emulator): when it and the emulator
agree, it is because both follow protocol.md, not because they share a bug.
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

CONNECTOR_UA = "fastproxy-tests/0"


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey, pkcs1: bool = False) -> str:
    fmt = (
        serialization.PublicFormat.PKCS1
        if pkcs1
        else serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key.public_key().public_bytes(serialization.Encoding.PEM, fmt).decode()


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def mdx_request(token: str, auth_type: int, user_agent: str = CONNECTOR_UA) -> bytes:
    body = b""
    if user_agent:
        ua = user_agent.encode()
        body += b"\x0a" + _varint(len(ua)) + ua
    if auth_type:
        body += b"\x10" + _varint(auth_type)
    if token:
        t = token.encode()
        body += b"\x1a" + _varint(len(t)) + t
    return struct.pack(">I", len(body)) + body


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_mdx_response(sock: socket.socket) -> tuple[int, str]:
    (size,) = struct.unpack(">I", recv_exactly(sock, 4))
    body = recv_exactly(sock, size)
    code, error, i = 0, "", 0
    while i < len(body):
        key = body[i]
        i += 1
        if key == 0x08:
            code = body[i]
            i += 1
        elif key == 0x12:
            ln = body[i]
            i += 1
            error = body[i : i + ln].decode()
            i += ln
        else:
            raise ValueError(f"unexpected key {key:#x} in {body!r}")
    return code, error


@dataclass
class IssuedMaterial:
    key: rsa.RSAPrivateKey
    chain: list[str]
    ca_cert: str
    info: dict[str, Any]


class AdminClient:
    def __init__(self, endpoint: str, token: str, version: str = "v1beta") -> None:
        self.endpoint = endpoint.rstrip("/")
        self.token = token
        self.version = version

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}

    def connection_info(self, uri: str) -> requests.Response:
        return requests.get(
            f"{self.endpoint}/{self.version}/{uri}/connectionInfo",
            headers=self._headers(),
            timeout=30,
        )

    def generate(
        self, cluster: str, public_key: str, use_mdx: bool = True, duration: str = "3600s"
    ) -> requests.Response:
        body: dict[str, Any] = {"publicKey": public_key, "certDuration": duration}
        if use_mdx:
            body["useMetadataExchange"] = True
        return requests.post(
            f"{self.endpoint}/{self.version}/{cluster}:generateClientCertificate",
            json=body,
            headers=self._headers(),
            timeout=30,
        )

    def issue(self, uri: str, use_mdx: bool = True, pkcs1: bool = False) -> IssuedMaterial:
        key = new_key()
        info = self.connection_info(uri)
        info.raise_for_status()
        cluster = uri.rsplit("/instances/", 1)[0]
        resp = self.generate(cluster, public_pem(key, pkcs1=pkcs1), use_mdx=use_mdx)
        resp.raise_for_status()
        data = resp.json()
        return IssuedMaterial(key, data["pemCertificateChain"], data["caCert"], info.json())


def tls_context(
    material: IssuedMaterial | None,
    tmp: Path,
    ca_cert: str | None = None,
    tls12: bool = False,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=ca_cert or (material.ca_cert if material else None))
    if material is not None:
        # The standard library loads client certificates only from files: test-only.
        certfile = tmp / f"chain-{id(material)}.pem"
        keyfile = tmp / f"key-{id(material)}.pem"
        certfile.write_text("".join(material.chain))
        keyfile.write_bytes(private_pem(material.key))
        ctx.load_cert_chain(str(certfile), str(keyfile))
    return ctx


def connect(ctx: ssl.SSLContext, ip: str, port: int = 5433, timeout: float = 30) -> ssl.SSLSocket:
    raw = socket.create_connection((ip, port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname=ip)
    except BaseException:
        raw.close()
        raise
