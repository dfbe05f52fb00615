"""End to end: psql, pgbench and raw sockets → ``fastproxy`` → emulator → PostgreSQL or echo.

Every part is a real process on loopback; ports are chosen by the OS and read back.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import EmulatorProcess, ProxyProcess
from tests.e2e_support import (
    DEMO_URI,
    login_without_password,
    query_message,
    rewrite_address,
    rss_kib,
    write_static_info,
)

pytestmark = pytest.mark.e2e

IAM_USER = "iam-sa@demo-project.iam"


def _psql(port: int, sql: str, user: str = "postgres", password: str = "postgres") -> str:
    env = dict(os.environ, PGPASSWORD=password, PGCONNECT_TIMEOUT="30")
    proc = subprocess.run(
        [
            "psql",
            "-w",
            "-X",
            "-At",
            f"host=127.0.0.1 port={port} user={user} dbname=postgres sslmode=disable",
            "-c",
            sql,
        ],
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode()


@pytest.fixture
def pg_proxy(
    emulator_pg: EmulatorProcess, proxy_factory: Callable[..., ProxyProcess], tmp_path: Path
) -> ProxyProcess:
    static = write_static_info(emulator_pg, "native-token", tmp_path / "static.json")
    return proxy_factory(
        DEMO_URI, "--static-connection-info", str(static), "--token", "native-token", "--port", "0"
    )


@pytest.fixture
def echo_proxy(
    emulator_echo: EmulatorProcess, proxy_factory: Callable[..., ProxyProcess], tmp_path: Path
) -> ProxyProcess:
    static = write_static_info(emulator_echo, "echo-token", tmp_path / "static.json")
    return proxy_factory(
        DEMO_URI, "--static-connection-info", str(static), "--token", "echo-token", "--port", "0"
    )


# --- PostgreSQL through the proxy ----------------------------------------------------------------


def test_psql_select_1(pg_proxy: ProxyProcess) -> None:
    assert _psql(pg_proxy.port, "SELECT 1").strip() == "1"


def test_psql_ten_megabyte_result(pg_proxy: ProxyProcess) -> None:
    out = _psql(pg_proxy.port, "SELECT repeat('x', 1024) FROM generate_series(1, 10240)")
    lines = out.splitlines()
    assert len(lines) == 10240 and all(line == "x" * 1024 for line in lines)


def test_auto_iam_through_the_proxy_needs_no_password(
    emulator_pg: EmulatorProcess, proxy_factory: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    static = write_static_info(emulator_pg, "iam-token", tmp_path / "static.json")
    proxy = proxy_factory(
        DEMO_URI,
        "--static-connection-info",
        str(static),
        "--token",
        "iam-token",
        "--port",
        "0",
        "--auto-iam-authn",
    )
    assert _psql(proxy.port, "SELECT current_user", user=IAM_USER, password="").strip() == IAM_USER


def test_unix_socket_listener(
    emulator_pg: EmulatorProcess, proxy_factory: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    static = write_static_info(emulator_pg, "native-token", tmp_path / "static.json")
    # unix socket paths are limited to 108 bytes: pytest's tmp_path is too deep.
    sockdir = Path(tempfile.mkdtemp(prefix="fp-", dir="/tmp"))
    proxy_factory(
        DEMO_URI,
        "--static-connection-info",
        str(static),
        "--token",
        "native-token",
        "--unix-socket",
        str(sockdir),
    )
    sub = sockdir / "demo-project.us-central1.demo-cluster.demo-primary"
    assert (sub / ".s.PGSQL.5432").exists()
    env = dict(os.environ, PGPASSWORD="postgres")
    out = subprocess.run(
        ["psql", "-w", "-X", "-At", f"host={sub} user=postgres dbname=postgres", "-c", "SELECT 7"],
        capture_output=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == b"7"
    shutil.rmtree(sockdir, ignore_errors=True)


def _pgbench(args: list[str], host: str, port: int) -> str:
    env = dict(os.environ, PGPASSWORD="postgres")
    proc = subprocess.run(
        ["pgbench", "-h", host, "-p", str(port), "-U", "postgres", *args, "postgres"],
        capture_output=True,
        env=env,
        timeout=300,
    )
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, out
    return out


def _tps(out: str) -> float:
    m = re.search(r"tps = ([\d.]+)", out)
    assert m, out
    return float(m.group(1))


@pytest.mark.slow
def test_pgbench_through_the_proxy_has_no_failed_transactions(
    pg_proxy: ProxyProcess, emulator_pg: EmulatorProcess
) -> None:
    _pgbench(["-i", "-s", "1", "-q"], "127.0.0.1", pg_proxy.port)
    out = _pgbench(["-c", "16", "-j", "2", "-T", "20", "-n"], "127.0.0.1", pg_proxy.port)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert failed is not None and failed.group(1) == "0", out
    m = re.search(r"number of transactions actually processed: (\d+)", out)
    assert m and int(m.group(1)) > 0
    backend = emulator_pg.info["backend"]
    direct = _pgbench(["-c", "16", "-j", "2", "-T", "20", "-n"], backend["host"], backend["port"])
    print(f"\npgbench TPC-B -c16 -T20: proxy {_tps(out):.0f} tps, direct {_tps(direct):.0f} tps")


# --- byte integrity with the echo backend ---------------------------------------------------------


def _echo_roundtrip(port: int, total: int, chunk: int = 1 << 20) -> tuple[str, str]:
    """Send ``total`` random bytes on one connection while reading the echo concurrently."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
    errors: list[BaseException] = []

    def reader() -> None:
        got = 0
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        try:
            while got < total:
                n = sock.recv_into(view)
                if not n:
                    raise ConnectionError(f"EOF after {got} of {total}")
                recv_hash.update(view[:n])
                got += n
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    block = os.urandom(chunk)
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        # Vary the bytes per chunk so reordering or duplication would change the digest.
        data = hashlib.sha256(sent.to_bytes(8, "big")).digest() + block[32:n]
        sock.sendall(data[:n])
        sent_hash.update(data[:n])
        sent += n
    sock.shutdown(socket.SHUT_WR)
    t.join(timeout=600)
    assert not errors, errors
    assert sock.recv(1) == b""  # the proxy half-closed back after the echo finished
    sock.close()
    return sent_hash.hexdigest(), recv_hash.hexdigest()


@pytest.mark.slow
def test_one_gibibyte_on_eight_connections_is_byte_identical(echo_proxy: ProxyProcess) -> None:
    per_conn = (1 << 30) // 8
    results: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(_echo_roundtrip(echo_proxy.port, per_conn))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not errors, errors
    assert len(results) == 8
    for sent, received in results:
        assert sent == received


@pytest.fixture
def one_byte_records(emulator_echo: EmulatorProcess) -> Iterator[None]:
    url = f"{emulator_echo.admin_endpoint}/_emulator/one-byte-records"
    requests.post(url, json={"enabled": True}, timeout=30).raise_for_status()
    yield
    requests.post(url, json={"enabled": False}, timeout=30).raise_for_status()


def test_integrity_with_one_byte_tls_records(
    echo_proxy: ProxyProcess, one_byte_records: None
) -> None:
    sent, received = _echo_roundtrip(echo_proxy.port, 200_000, chunk=50_000)
    assert sent == received


def test_half_close_client_still_receives_everything(echo_proxy: ProxyProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", echo_proxy.port), timeout=60)
    payload = os.urandom(3 << 20)
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    got = bytearray()
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        got += chunk
    assert bytes(got) == payload
    sock.close()


# --- no blocking, deadlines and backpressure ------------------------------------------------------


@pytest.fixture
def silent_upstream() -> Iterator[str]:
    """A TCP server on a free loopback address's port 5433 that accepts and never answers."""
    import ipaddress

    from fastproxy.emulator.__main__ import allocate_addresses

    ip = allocate_addresses(1, ipaddress.IPv4Address("127.0.200.1"))[0]
    srv = socket.create_server((ip, 5433))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield ip
    stop.set()
    t.join(timeout=5)
    srv.close()
    for s in held:
        s.close()


def test_silent_upstream_does_not_block_others_and_times_out(
    emulator_echo: EmulatorProcess,
    proxy_factory: Callable[..., ProxyProcess],
    tmp_path: Path,
    silent_upstream: str,
) -> None:
    good = write_static_info(emulator_echo, "echo-token", tmp_path / "good.json")
    bad = write_static_info(emulator_echo, "echo-token", tmp_path / "bad.json")
    rewrite_address(bad, DEMO_URI, silent_upstream)
    stalled = proxy_factory(
        DEMO_URI,
        "--static-connection-info",
        str(bad),
        "--token",
        "echo-token",
        "--port",
        "0",
        "--dial-timeout",
        "3s",
    )
    working = proxy_factory(
        DEMO_URI, "--static-connection-info", str(good), "--token", "echo-token", "--port", "0"
    )
    # Ten connections stuck in the TLS handshake against the silent server...
    stuck = [socket.create_connection(("127.0.0.1", stalled.port)) for _ in range(10)]
    # ...while, in the same proxy process kind, traffic flows elsewhere.
    sent, received = _echo_roundtrip(working.port, 1 << 20)
    assert sent == received
    for s in stuck:
        s.settimeout(30)
        assert s.recv(1) == b""  # closed by the dial deadline, not left hanging
        s.close()
    deadline = time.monotonic() + 10
    while "timed out" not in stalled.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "timed out in the TLS handshake" in stalled.output()
    assert "Traceback" not in stalled.output()


@pytest.mark.slow
def test_client_that_stops_reading_keeps_proxy_memory_bounded(
    emulator_pg: EmulatorProcess, proxy_factory: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    static = write_static_info(emulator_pg, "iam-token", tmp_path / "static.json")
    proxy = proxy_factory(
        DEMO_URI,
        "--static-connection-info",
        str(static),
        "--token",
        "iam-token",
        "--port",
        "0",
        "--auto-iam-authn",
    )
    before = rss_kib(proxy.proc.pid)
    slow = socket.create_connection(("127.0.0.1", proxy.port), timeout=60)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    login_without_password(slow, IAM_USER)
    # 1 GiB result that the client never reads.
    slow.sendall(query_message("SELECT repeat('y', 1048576) FROM generate_series(1, 1024)"))
    peak = before
    for _ in range(30):
        time.sleep(0.1)  # sampling memory over time, not waiting for a server
        peak = max(peak, rss_kib(proxy.proc.pid))
    # Other connections keep flowing meanwhile.
    assert _psql(proxy.port, "SELECT 42", user=IAM_USER, password="").strip() == "42"
    for _ in range(20):
        time.sleep(0.1)
        peak = max(peak, rss_kib(proxy.proc.pid))
    growth = peak - before
    print(f"\nbackpressure: proxy RSS {before} KiB before, peak {peak} KiB (+{growth} KiB)")
    # Bound: high-water marks (256 KiB each way) + slabs + OpenSSL buffers, far below 1 GiB.
    assert growth < 32 * 1024
    slow.close()
