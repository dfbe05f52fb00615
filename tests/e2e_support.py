"""Helpers for the end-to-end tests: static connection info and the proxy arguments that use it,
free ports, HTTP status probes, one-shot echoes, raw PostgreSQL messages, RSS."""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

import requests

from fastproxy.emulator.static_info import build_static_info, write_private_json
from tests.conftest import EmulatorProcess

DEMO_URI = (
    "projects/demo-project/locations/us-central1/clusters/demo-cluster/instances/demo-primary"
)


def write_static_info(
    emu: EmulatorProcess, token: str, path: Path, *, uris: list[str] | None = None, **kw: Any
) -> Path:
    data = build_static_info(
        emu.admin_endpoint, token, uris or [i["uri"] for i in emu.info["instances"]], **kw
    )
    write_private_json(path, data)
    return path


def static_args(static: Path, token: str) -> list[str]:
    """Arguments for a proxy of the demo instance from the static connection-info file
    ``static``, on a port the OS chooses."""
    return [DEMO_URI, "--static-connection-info", str(static), "--token", token, "--port", "0"]


def rewrite_address(static: Path, uri: str, ip: str) -> None:
    data = json.loads(static.read_text())
    data[uri]["ipAddress"] = ip
    write_private_json(static, data)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str) -> int:
    """The status code of a GET of ``url``; -1 while nothing accepts the connection."""
    try:
        return requests.get(url, timeout=2).status_code
    except requests.ConnectionError:
        return -1


def echo_once(port: int, payload: bytes, timeout: float = 30) -> bytes:
    """One connection to 127.0.0.1:``port``: send ``payload``, half-close, and return everything
    that comes back before the other side closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := s.recv(65536):
            got += chunk
        return bytes(got)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def startup_message(user: str, database: str = "postgres") -> bytes:
    params = f"user\0{user}\0database\0{database}\0\0".encode()
    return struct.pack(">ii", 8 + len(params), 196608) + params


def query_message(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack(">i", 4 + len(body)) + body


def read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    head = recv_exactly(sock, 5)
    (length,) = struct.unpack(">i", head[1:])
    return head[:1], recv_exactly(sock, length - 4)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def login_without_password(sock: socket.socket, user: str) -> None:
    """StartupMessage, then read until ReadyForQuery; AUTO_IAM needs no password."""
    sock.sendall(startup_message(user))
    while True:
        kind, body = read_message(sock)
        if kind == b"E":
            raise ConnectionError(body.decode(errors="replace"))
        if kind == b"R" and struct.unpack(">i", body[:4])[0] != 0:
            raise ConnectionError(f"server asked for a password: {body!r}")
        if kind == b"Z":
            return
