"""End to end through the Admin API: ``fastproxy --alloydbadmin-api-endpoint ... --token ...``.

Certificates come from the emulator's Admin API and are refreshed by the refresher thread; these
tests cover logins, rotation under load, an Admin API outage and the API's errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509

from tests.conftest import REPO, EmulatorProcess, ProxyProcess
from tests.e2e_support import DEMO_URI, echo_once, write_static_info

pytestmark = pytest.mark.e2e

IAM_USER = "iam-sa@demo-project.iam"


def _api_args(emu: EmulatorProcess, token: str) -> list[str]:
    return ["--alloydbadmin-api-endpoint", emu.admin_endpoint, "--token", token, "--port", "0"]


def _psql(port: int, sql: str, user: str, password: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PGPASSWORD=password, PGCONNECT_TIMEOUT="30")
    return subprocess.run(
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
        text=True,
        timeout=120,
    )


def _state(emu: EmulatorProcess) -> dict[str, Any]:
    r = requests.get(f"{emu.admin_endpoint}/_emulator/state", timeout=30)
    r.raise_for_status()
    return dict(r.json())


def _issued(emu: EmulatorProcess) -> int:
    return int(_state(emu)["counters"]["certificates_issued"])


# --- logins --------------------------------------------------------------------------------------


def test_db_native_user_through_the_admin_api(
    emulator_pg: EmulatorProcess, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_factory(DEMO_URI, *_api_args(emulator_pg, "native-token"))
    out = _psql(proxy.port, "SELECT current_user", "postgres", "postgres")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "postgres"


def test_iam_principal_without_password_through_the_admin_api(
    emulator_pg: EmulatorProcess, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_factory(DEMO_URI, *_api_args(emulator_pg, "iam-token"), "--auto-iam-authn")
    out = _psql(proxy.port, "SELECT current_user", IAM_USER, "")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == IAM_USER


def test_lazy_refresh_serves_too(
    emulator_pg: EmulatorProcess, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_factory(DEMO_URI, *_api_args(emulator_pg, "native-token"), "--lazy-refresh")
    out = _psql(proxy.port, "SELECT 5", "postgres", "postgres")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5"


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token, uri, expected",
    [
        ("wrong-token", DEMO_URI, "HTTP 401"),
        ("forbidden-token", DEMO_URI, "caller lacks permission"),
        (
            "native-token",
            "projects/demo-project/locations/us-central1/clusters/demo-cluster/instances/nope",
            "instance not found",
        ),
    ],
)
def test_admin_api_errors_are_one_clear_line_and_the_proxy_stays_up(
    emulator_pg: EmulatorProcess,
    proxy_factory: Callable[..., ProxyProcess],
    token: str,
    uri: str,
    expected: str,
) -> None:
    proxy = proxy_factory(uri, *_api_args(emulator_pg, token))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as s:
        s.settimeout(60)
        assert s.recv(1) == b""  # closed, with the reason in the log
    deadline = time.monotonic() + 30
    while expected not in proxy.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert expected in proxy.output(), proxy.output()
    assert "Traceback" not in proxy.output()
    assert proxy.proc.poll() is None


def test_run_connection_test_exits_1_on_failure(emulator_pg: EmulatorProcess) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastproxy",
            DEMO_URI,
            *_api_args(emulator_pg, "wrong-token"),
            "--run-connection-test",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(REPO),
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "HTTP 401" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_run_connection_test_passes_then_serves(
    emulator_pg: EmulatorProcess, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_factory(
        DEMO_URI, *_api_args(emulator_pg, "native-token"), "--run-connection-test"
    )
    assert "Connection test passed" in proxy.output()
    out = _psql(proxy.port, "SELECT 3", "postgres", "postgres")
    assert out.stdout.strip() == "3", out.stderr


def test_unreachable_instance_is_one_clear_line(
    emulator_factory: Callable[..., EmulatorProcess], proxy_factory: Callable[..., ProxyProcess]
) -> None:
    emu = emulator_factory("--backend", "echo", "--token", "t=u@example.com")
    proxy = proxy_factory(DEMO_URI, *_api_args(emu, "t"), "--dial-timeout", "5s")
    assert echo_once(proxy.port, b"ping") == b"ping"
    # The emulator goes away: new connections fail with a clear reason, the proxy stays up.
    emu.stop()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as s:
        s.settimeout(60)
        assert s.recv(1) == b""
    deadline = time.monotonic() + 30
    while "failed to dial" not in proxy.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "failed to dial" in proxy.output()
    assert "Traceback" not in proxy.output()
    assert proxy.proc.poll() is None


# --- rotation under load -----------------------------------------------------------------


class _Stream(threading.Thread):
    """A long-lived connection streaming checksummed data through the echo backend.

    Steady (the bounded variant): 64 KiB, wait for its echo, pause 10 ms. Saturating (the long
    variant): a writer and a reader thread keep the connection full both ways.
    """

    def __init__(self, port: int, stop: threading.Event, *, saturate: bool = False) -> None:
        super().__init__(daemon=True)
        self.port, self.stop_event, self.saturate = port, stop, saturate
        self.sent = 0
        self.received = 0
        self.ok = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
            if self.saturate:
                self._saturating(sock)
            else:
                self._steady(sock)
        except BaseException as exc:
            self.error = exc

    def _steady(self, sock: socket.socket) -> None:
        sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
        rnd = random.Random(self.port ^ id(self))
        while not self.stop_event.is_set():
            block = rnd.randbytes(64 * 1024)
            sock.sendall(block)
            sent_hash.update(block)
            self.sent += len(block)
            while self.received < self.sent:
                chunk = sock.recv(min(262144, self.sent - self.received))
                if not chunk:
                    raise ConnectionError("stream closed by the proxy")
                recv_hash.update(chunk)
                self.received += len(chunk)
            time.sleep(0.01)  # a steady stream, not a saturating one
        sock.close()
        self.ok = sent_hash.digest() == recv_hash.digest() and self.received == self.sent

    def _saturating(self, sock: socket.socket) -> None:
        sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
        errors: list[BaseException] = []

        def reader() -> None:
            buf = memoryview(bytearray(1 << 20))
            try:
                while True:
                    n = sock.recv_into(buf)
                    if not n:
                        return
                    recv_hash.update(buf[:n])
                    self.received += n
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        base = os.urandom(1 << 20)
        n = 0
        while not self.stop_event.is_set():
            # Every block differs (its counter in front), so a lost, duplicated or reordered
            # block changes the digest.
            block = n.to_bytes(8, "big") + base[8:]
            sock.sendall(block)
            sent_hash.update(block)
            self.sent += len(block)
            n += 1
        sock.shutdown(socket.SHUT_WR)
        t.join(timeout=600)
        sock.close()
        if errors:
            raise errors[0]
        self.ok = sent_hash.digest() == recv_hash.digest() and self.received == self.sent


LONG = os.environ.get("FASTPROXY_LONG") == "1"
#: The long variant: at least this many bytes through the proxy (each way) and 6 rotations.
LONG_BYTES = int(float(os.environ.get("FASTPROXY_ROTATION_BYTES", "10e9")))
LONG_CAP_S = 3600.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [
        "bounded",
        pytest.param(
            "long",
            marks=[
                pytest.mark.long,
                pytest.mark.skipif(not LONG, reason="long variant: set FASTPROXY_LONG=1"),
                pytest.mark.timeout(LONG_CAP_S + 900),
            ],
        ),
    ],
)
def test_rotation_under_load(
    emulator_factory: Callable[..., EmulatorProcess],
    proxy_factory: Callable[..., ProxyProcess],
    variant: str,
) -> None:
    """Certificates rotate (60 s certificates: a refresh every ~30 s, the rate limit) while
    long-lived streams and short connections carry checksummed data: no byte lost or corrupted,
    no new connection refused. Bounded: 190 s (``FASTPROXY_ROTATION_SECONDS``), steady streams.
    Long: saturating streams until ``FASTPROXY_ROTATION_BYTES`` (10 GB) went through each way and
    at least 6 certificates were issued."""
    long = variant == "long"
    duration = float(os.environ.get("FASTPROXY_ROTATION_SECONDS", "190"))
    emu = emulator_factory(
        "--backend", "echo", "--token", "t=u@example.com", "--cert-lifetime", "60"
    )
    proxy = proxy_factory(DEMO_URI, *_api_args(emu, "t"))
    stop = threading.Event()
    streams = [_Stream(proxy.port, stop, saturate=long) for _ in range(4)]
    issued_before = _issued(emu)
    started = time.monotonic()
    for s in streams:
        s.start()
    churn_ok = 0
    churn_failed: list[str] = []
    churn_bytes = 0
    lock = threading.Lock()

    def churn(seed: int) -> None:
        nonlocal churn_ok, churn_bytes
        rnd = random.Random(seed)
        while not stop.is_set():
            payload = rnd.randbytes(rnd.randint(1, 32 * 1024))
            try:
                got = echo_once(proxy.port, payload)
            except OSError as exc:
                with lock:
                    churn_failed.append(repr(exc))
                continue
            with lock:
                if got == payload:
                    churn_ok += 1
                    churn_bytes += len(payload)
                else:
                    churn_failed.append(f"corrupted: {len(got)} of {len(payload)} bytes")
            time.sleep(rnd.uniform(0.05, 0.3))

    churners = [threading.Thread(target=churn, args=(i,), daemon=True) for i in range(20)]
    for t in churners:
        t.start()

    def done() -> bool:
        elapsed = time.monotonic() - started
        if not long:
            return elapsed >= duration
        carried = sum(s.sent for s in streams)
        return (carried >= LONG_BYTES and _issued(emu) - issued_before >= 6) or (
            elapsed >= LONG_CAP_S
        )

    while not done():
        if any(s.error is not None for s in streams):
            break
        time.sleep(1.0)  # sampling progress, not waiting for a server
    stop.set()
    for t in churners:
        t.join(timeout=120)
    for s in streams:
        s.join(timeout=900)
    elapsed = time.monotonic() - started
    rotations = _issued(emu) - issued_before
    streamed = sum(s.sent for s in streams)
    echoed = sum(s.received for s in streams)
    print(
        f"\nrotation ({variant}): {rotations} new certificates in {elapsed:.0f} s; {churn_ok} "
        f"short connections ({churn_bytes} bytes) verified, {len(churn_failed)} failed; 4 "
        f"long-lived streams carried {streamed} bytes out and {echoed} back "
        f"({(streamed + echoed) / elapsed / 1e6:.0f} MB/s), verified by sha256"
    )
    assert not churn_failed, churn_failed[:5]
    for s in streams:
        assert s.error is None, s.error
        assert s.ok
    assert rotations >= 6
    if long:
        assert streamed >= LONG_BYTES, f"only {streamed} bytes in {elapsed:.0f} s"
    assert "Traceback" not in proxy.output()


# --- outage ------------------------------------------------------------------------------


@pytest.mark.slow
def test_admin_api_outage_longer_than_a_certificate(
    emulator_factory: Callable[..., EmulatorProcess], proxy_factory: Callable[..., ProxyProcess]
) -> None:
    emu = emulator_factory(
        "--backend", "echo", "--token", "t=u@example.com", "--cert-lifetime", "60"
    )
    proxy = proxy_factory(DEMO_URI, *_api_args(emu, "t"))
    assert echo_once(proxy.port, b"before") == b"before"
    fail = f"{emu.admin_endpoint}/_emulator/fail"
    requests.post(
        fail, json={"count": 100000, "status": 503, "message": "outage"}, timeout=30
    ).raise_for_status()
    outage_start = time.monotonic()
    # The last good certificate keeps serving while it is valid...
    assert echo_once(proxy.port, b"during") == b"during"
    # ...then, once it has expired (60 s certificates), new connections fail with a clear cause.
    failed_clearly = False
    while time.monotonic() - outage_start < 90:
        try:
            got = echo_once(proxy.port, b"x", timeout=40)
        except OSError:
            got = b""
        if got == b"":
            failed_clearly = True
            break
        time.sleep(1)
    assert failed_clearly, "connections kept working past the certificate's expiry"
    assert "503" in proxy.output(), proxy.output()[-3000:]
    while time.monotonic() - outage_start < 90:
        time.sleep(0.5)  # keep the outage going for 90 s in all
    requests.post(f"{emu.admin_endpoint}/_emulator/reset", timeout=30).raise_for_status()
    recovered = time.monotonic()
    # Service resumes within one rate-limit window (30 s) plus the back-off, without a restart.
    while True:
        try:
            if echo_once(proxy.port, b"after", timeout=40) == b"after":
                break
        except OSError:
            pass
        assert time.monotonic() - recovered < 75, proxy.output()[-3000:]
        time.sleep(1)
    assert proxy.proc.poll() is None
    assert "Traceback" not in proxy.output()


def test_expired_static_certificate_is_one_clear_line_and_the_proxy_stays_up(
    emulator_factory: Callable[..., EmulatorProcess],
    proxy_factory: Callable[..., ProxyProcess],
    tmp_path: Path,
) -> None:
    emu = emulator_factory(
        "--backend", "echo", "--token", "t=u@example.com", "--cert-lifetime", "5"
    )
    static = write_static_info(emu, "t", tmp_path / "static.json")
    expiry = json.loads(static.read_text())[DEMO_URI]["pemCertificateChain"][0]
    not_after = x509.load_pem_x509_certificate(expiry.encode()).not_valid_after_utc.timestamp()
    while time.time() <= not_after + 0.5:
        time.sleep(0.2)  # waiting for a wall-clock expiry, not for a server
    proxy = proxy_factory(
        DEMO_URI, "--static-connection-info", str(static), "--token", "t", "--port", "0"
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as s:
        s.settimeout(60)
        assert s.recv(1) == b""
    deadline = time.monotonic() + 30
    while "no connection info" not in proxy.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "expired" in proxy.output() and "never refreshed" in proxy.output()
    assert "Traceback" not in proxy.output()
    assert proxy.proc.poll() is None
