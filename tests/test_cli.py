"""``python -m fastproxy``: usage errors (exit 1, one line, no traceback), --version, signals."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fastproxy import __version__
from tests.conftest import REPO, EmulatorProcess, ProxyProcess, start_proxy_process
from tests.e2e_support import DEMO_URI, write_static_info
from tests.inproc_support import ECHO_TOKEN, connect, echo, recv_eof


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastproxy", *args],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        timeout=60,
    )


def _assert_usage_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fastproxy: error: "), lines[0]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--bogus", DEMO_URI), "unrecognized arguments: --bogus"),
        (("--port", "abc", DEMO_URI), "invalid int value: 'abc'"),
        ((), "missing instance URI"),
        (("not/an/instance",), "invalid instance URI"),
        (
            ("--unix-socket", "/tmp/fp-cli-unused", "--port", "5000", DEMO_URI),
            "cannot specify --unix-socket and --port together",
        ),
        (
            (DEMO_URI, "--token", "t", "--credentials-file", "/nonexistent.json"),
            "cannot specify --token and --credentials-file flags at the same time",
        ),
        (
            (DEMO_URI, "--static-connection-info", "/nonexistent/static.json"),
            "cannot read static connection info /nonexistent/static.json",
        ),
        (
            (DEMO_URI, "--static-connection-info", "/dev/null", "--dial-timeout", "30"),
            "invalid duration '30'",
        ),
        (
            (DEMO_URI, "--static-connection-info", "/dev/null", "--dial-timeout", "0"),
            "--dial-timeout must be positive",
        ),
    ],
    ids=[
        "bad-flag",
        "bad-int",
        "no-instance",
        "bad-uri",
        "unix-and-port",
        "exclusive-credentials",
        "missing-static-file",
        "bad-duration",
        "zero-duration",
    ],
)
def test_usage_errors(args: tuple[str, ...], needle: str) -> None:
    _assert_usage_error(_run(*args), needle)


def test_bad_uri_is_reported_before_the_static_file_is_read() -> None:
    proc = _run("nope", "--static-connection-info", "/nonexistent/static.json")
    _assert_usage_error(proc, "invalid instance URI")


def test_bad_instance_query() -> None:
    _assert_usage_error(_run(f"{DEMO_URI}?port=x"), "invalid ?port=")


def test_version() -> None:
    proc = _run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"fastproxy {__version__}"
    assert proc.stderr == ""


@pytest.fixture
def static_file(emulator_echo: EmulatorProcess, tmp_path: Path) -> Path:
    return write_static_info(emulator_echo, ECHO_TOKEN, tmp_path / "static.json")


def _start(static: Path) -> ProxyProcess:
    return start_proxy_process(
        DEMO_URI, "--static-connection-info", str(static), "--token", ECHO_TOKEN, "--port", "0"
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(static_file: Path, sig: signal.Signals) -> None:
    proxy = _start(static_file)
    try:
        sock = connect(proxy.port)
        echo(sock, b"before the signal")
        rc = proxy.stop(sig)
        assert recv_eof(sock) == b""  # in-flight connections are closed, not left hanging
        sock.close()
    finally:
        proxy.stop(signal.SIGKILL)
    out = proxy.output()
    assert rc == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], out
    assert f"Received {sig.name}, shutting down" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out


def test_gc_tuning_freezes_start_up_objects_and_raises_the_threshold() -> None:
    import gc

    from fastproxy.__main__ import GC_GEN0_THRESHOLD, _tune_gc

    before = gc.get_threshold()
    try:
        _tune_gc()
        assert gc.get_threshold()[0] == GC_GEN0_THRESHOLD
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
