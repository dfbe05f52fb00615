"""Graceful shutdown of the real process: drain timing, exit codes, readiness during the drain,
/quitquitquit and ``fastproxy shutdown``/``wait``, a second SIGINT, systemd's READY=1.

Every case runs ``python -m fastproxy`` against the echo emulator over loopback.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, EmulatorProcess, ProxyProcess, start_proxy_process
from tests.e2e_support import free_port, http_status, static_args, write_static_info
from tests.inproc_support import ECHO_TOKEN, connect, echo, recv_eof


@pytest.fixture
def static_file(emulator_echo: EmulatorProcess, tmp_path: Path) -> Path:
    return write_static_info(emulator_echo, ECHO_TOKEN, tmp_path / "static.json")


def _start(static: Path, *extra: str) -> ProxyProcess:
    return start_proxy_process(*static_args(static, ECHO_TOKEN), *extra)


def _wait_exit(proxy: ProxyProcess, timeout: float = 30) -> int:
    rc = proxy.proc.wait(timeout=timeout)
    if proxy.drainer is not None:
        proxy.drainer.join(timeout=10)
    return int(rc)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("sig", "flags", "expected"),
    [
        (signal.SIGTERM, (), 143),
        (signal.SIGTERM, ("--exit-zero-sigterm",), 0),
        (signal.SIGINT, (), 130),
        (signal.SIGINT, ("--exit-zero-sigterm",), 130),  # the flag is about SIGTERM only
    ],
    ids=["sigterm", "sigterm-exit-zero", "sigint", "sigint-exit-zero-ignored"],
)
def test_exit_codes(
    static_file: Path, sig: signal.Signals, flags: tuple[str, ...], expected: int
) -> None:
    proxy = _start(static_file, *flags)
    try:
        sock = connect(proxy.port)
        echo(sock, b"hello")
        proxy.proc.send_signal(sig)
        rc = _wait_exit(proxy)
        assert recv_eof(sock) == b""
        sock.close()
    finally:
        proxy.stop(signal.SIGKILL)
    out = proxy.output()
    assert rc == expected, out
    assert "Traceback" not in out


@pytest.mark.e2e
def test_drain_waits_for_open_connections_then_exits(static_file: Path) -> None:
    """min delay: still accepting; then readiness 503 and listeners closed; an open connection
    keeps working until it closes, and the process exits right after it (well before max)."""
    http_port = free_port()
    proxy = _start(
        static_file,
        "--health-check",
        "--http-port",
        str(http_port),
        "--min-sigterm-delay",
        "2s",
        "--max-sigterm-delay",
        "20s",
    )
    base = f"http://localhost:{http_port}"
    try:
        assert http_status(base + "/readiness") == 200
        held = connect(proxy.port)
        echo(held, b"held across the drain")
        t0 = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # Within --min-sigterm-delay: new connections are still accepted and served.
        late = connect(proxy.port)
        echo(late, b"accepted during the min delay")
        late.close()
        assert http_status(base + "/readiness") == 200
        # After the min delay: readiness 503, the listener is closed.
        deadline = time.monotonic() + 10
        while http_status(base + "/readiness") != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        t_unready = time.monotonic() - t0
        assert http_status(base + "/readiness") == 503
        assert 1.5 <= t_unready <= 6, t_unready
        deadline = time.monotonic() + 5
        while not _refused(proxy.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _refused(proxy.port)
        # The held connection still works during the drain, then closes; the proxy exits.
        time.sleep(1.0)
        echo(held, b"still flowing while draining")
        assert proxy.proc.poll() is None
        t_close = time.monotonic()
        held.close()
        rc = _wait_exit(proxy)
        t_exit = time.monotonic() - t_close
    finally:
        proxy.stop(signal.SIGKILL)
    out = proxy.output()
    print(
        f"\ndrain: readiness 503 after {t_unready:.2f} s (--min-sigterm-delay 2s); "
        f"exit {t_exit:.2f} s after the last connection closed (--max-sigterm-delay 20s)"
    )
    assert rc == 143, out
    assert t_exit < 5, t_exit  # it did not sit out the 20 s max delay
    assert "Waiting up to 20s for 1 open connections" in out, out


@pytest.mark.e2e
def test_connections_left_after_max_delay_exit_1(static_file: Path) -> None:
    proxy = _start(static_file, "--max-sigterm-delay", "1s")
    try:
        held = connect(proxy.port)
        echo(held, b"never closed by the client")
        t0 = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        rc = _wait_exit(proxy)
        elapsed = time.monotonic() - t0
        assert recv_eof(held) == b""
        held.close()
    finally:
        proxy.stop(signal.SIGKILL)
    out = proxy.output()
    assert rc == 1, out
    assert 0.9 <= elapsed < 10, elapsed
    assert "1 active connections still open after waiting 1s" in out


@pytest.mark.e2e
def test_second_sigint_exits_at_once(static_file: Path) -> None:
    proxy = _start(static_file, "--min-sigterm-delay", "30s", "--max-sigterm-delay", "30s")
    try:
        held = connect(proxy.port)
        echo(held, b"x")
        proxy.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        t0 = time.monotonic()
        proxy.proc.send_signal(signal.SIGINT)
        rc = _wait_exit(proxy, timeout=15)
        elapsed = time.monotonic() - t0
        held.close()
    finally:
        proxy.stop(signal.SIGKILL)
    assert rc == 130, proxy.output()
    assert elapsed < 5, elapsed
    assert "Traceback" not in proxy.output()


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastproxy", *args],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        timeout=timeout,
    )


@pytest.mark.e2e
def test_wait_then_shutdown_subcommands(static_file: Path) -> None:
    http_port, admin_port = free_port(), free_port()
    proxy = _start(
        static_file,
        "--health-check",
        "--http-port",
        str(http_port),
        "--quitquitquit",
        "--admin-port",
        str(admin_port),
    )
    try:
        waited = _cli("wait", "--max", "10s", "--http-port", str(http_port))
        assert waited.returncode == 0, waited.stderr
        sock = connect(proxy.port)
        echo(sock, b"before shutdown")
        sock.close()
        down = _cli("shutdown", "--admin-port", str(admin_port))
        assert down.returncode == 0, down.stderr
        rc = _wait_exit(proxy)
    finally:
        proxy.stop(signal.SIGKILL)
    out = proxy.output()
    assert rc == 0, out  # /quitquitquit exits 0
    assert "Received /quitquitquit request, shutting down" in out
    # Nothing listens any more: both subcommands fail with one clear line.
    waited = _cli("wait", "--max", "1s", "--http-port", str(http_port))
    assert waited.returncode == 1
    assert waited.stderr.count("\n") == 1 and "did not start within 1s" in waited.stderr
    down = _cli("shutdown", "--admin-port", str(admin_port))
    assert down.returncode == 1
    assert "failed to send shutdown request" in down.stderr


@pytest.mark.e2e
def test_systemd_ready_notification(static_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(30)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastproxy",
            *static_args(static_file, ECHO_TOKEN),
        ],
        cwd=str(REPO),
        env={**__import__("os").environ, "NOTIFY_SOCKET": str(path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert receiver.recv(256) == b"READY=1"
        proc.send_signal(signal.SIGTERM)
        assert receiver.recv(256) == b"STOPPING=1"
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
        proc.wait()
        receiver.close()


@pytest.mark.e2e
def test_sighup_is_ignored(static_file: Path) -> None:
    proxy = _start(static_file)
    try:
        sock = connect(proxy.port)
        echo(sock, b"before")
        proxy.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proxy.proc.poll() is None
        echo(sock, b"after the hang-up")
        sock.close()
        rc = proxy.stop(signal.SIGTERM)
    finally:
        proxy.stop(signal.SIGKILL)
    out = proxy.output()
    assert rc == 143, out
    assert "Received SIGHUP: ignored" in out
    assert "Traceback" not in out
