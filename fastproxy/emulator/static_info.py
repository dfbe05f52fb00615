"""``python -m fastproxy.emulator.static_info``: write a static connection-info file (§5.6).

Asks a running emulator for a client certificate for a fresh RSA key and writes the JSON that
``--static-connection-info`` reads (the Go Auth Proxy's format). It is a development tool: the file
holds a private key, so it is created with mode 0600; use it for demos, tests and benchmarks only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def build_static_info(
    admin_endpoint: str,
    token: str,
    uris: Sequence[str],
    use_metadata_exchange: bool = True,
    cert_duration: str = "3600s",
) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    headers = {"Authorization": f"Bearer {token}"}
    out: dict[str, Any] = {"publicKey": public_pem, "privateKey": private_pem}
    base = admin_endpoint.rstrip("/")
    for uri in uris:
        info = requests.get(f"{base}/v1beta/{uri}/connectionInfo", headers=headers, timeout=30)
        info.raise_for_status()
        cluster = uri.rsplit("/instances/", 1)[0]
        body: dict[str, Any] = {"publicKey": public_pem, "certDuration": cert_duration}
        if use_metadata_exchange:
            body["useMetadataExchange"] = True
        cert = requests.post(
            f"{base}/v1beta/{cluster}:generateClientCertificate",
            json=body,
            headers=headers,
            timeout=30,
        )
        cert.raise_for_status()
        ci, cc = info.json(), cert.json()
        entry: dict[str, Any] = {
            "pemCertificateChain": cc["pemCertificateChain"],
            "caCert": cc["caCert"],
        }
        if "ipAddress" in ci:
            entry["ipAddress"] = ci["ipAddress"]
        if "publicIpAddress" in ci:
            entry["publicIpAddress"] = ci["publicIpAddress"]
        if "pscDnsName" in ci:
            entry["pscInstanceConfig"] = {"pscDnsName": ci["pscDnsName"]}
        out[uri] = entry
    return out


def write_private_json(path: Path, data: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastproxy.emulator.static_info")
    p.add_argument("--ready-file", type=Path, required=True, help="the emulator's ready file")
    p.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    p.add_argument("--no-metadata-exchange", action="store_true")
    p.add_argument("--cert-duration", default="3600s")
    args = p.parse_args(argv)
    try:
        ready = json.loads(args.ready_file.read_text())
        data = build_static_info(
            ready["admin_endpoint"],
            ready["tokens"][0]["token"],
            [i["uri"] for i in ready["instances"]],
            use_metadata_exchange=not args.no_metadata_exchange,
            cert_duration=args.cert_duration,
        )
        write_private_json(args.out, data)
    except (OSError, ValueError, KeyError, requests.RequestException) as exc:
        print(f"static_info: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
