"""``scripts/demo`` (the README's first command) end to end: set-up, the emulator with its own
PostgreSQL, the proxy, real psql through it, and Ctrl-C leaving nothing behind.

The demo runs in its own session, as in a terminal: SIGINT goes to its whole process group, the
way Ctrl-C does.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastproxy import demo
from tests.conftest import REPO
from tests.e2e_support import free_port

pytestmark = pytest.mark.e2e

READY_TIMEOUT_S = 240.0  # scripts/setup (fast once installed), initdb, the proxy
STOP_TIMEOUT_S = 120.0
PSQL_HINT = re.compile(r'psql "(host=127\.0\.0\.1 port=(\d+) user=postgres sslmode=disable)"')
EMULATOR_READY = re.compile(r"demo: emulator ready \(pid (\d+)\).* PostgreSQL ([\d.]+):(\d+) ")
PROXY_READY = re.compile(r"demo: proxy ready \(pid (\d+)\)")


class DemoRun:
    """``scripts/demo ARGS`` with ``PORT=port``; its output collected on a thread."""

    def __init__(self, port: int, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(REPO / "scripts" / "demo"), *args],
            cwd=str(REPO),
            env=dict(os.environ, PORT=str(port)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: re.Pattern[str], timeout: float = READY_TIMEOUT_S) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            while seen < len(self.lines):
                m = pattern.search(self.lines[seen])
                seen += 1
                if m:
                    return m
            if not self._reader.is_alive():
                pytest.fail(f"demo ended without {pattern.pattern!r}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {pattern.pattern!r} within {timeout:.0f} s:\n{self.output()}")
            time.sleep(0.05)

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout: float = STOP_TIMEOUT_S) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"demo still running {timeout:.0f} s later:\n{self.output()}")
        self._reader.join(10)
        return rc

    def kill(self) -> None:
        """Teardown for a failed test: the demo stops its children on SIGTERM (and they get
        SIGTERM from the kernel should it die)."""
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.proc.wait()
        self._reader.join(10)


@pytest.fixture
def demos() -> Iterator[list[DemoRun]]:
    started: list[DemoRun] = []
    yield started
    for d in started:
        d.kill()


def _start(demos: list[DemoRun], port: int, *args: str) -> DemoRun:
    d = DemoRun(port, *args)
    demos.append(d)
    return d


def _psql(conninfo: str, sql: str) -> subprocess.CompletedProcess[str]:
    # -w: never prompt for a password; IAM database authentication needs none.
    return subprocess.run(
        ["psql", "-w", "-X", "-At", "-v", "ON_ERROR_STOP=1", conninfo, "-c", sql],
        capture_output=True,
        text=True,
        env=dict(os.environ, PGCONNECT_TIMEOUT="30"),
        timeout=120,
    )


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _refused(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex((host, port)) != 0


def _assert_clean(out: str) -> None:
    assert "Traceback" not in out, out
    assert "KeyboardInterrupt" not in out, out


def test_demo_psql_then_ctrl_c(demos: list[DemoRun]) -> None:
    port = free_port()
    d = _start(demos, port)
    emu = d.wait_for(EMULATOR_READY)
    emulator_pid, pg_host, pg_port = int(emu[1]), emu[2], int(emu[3])
    proxy_pid = int(d.wait_for(PROXY_READY)[1])
    hint = d.wait_for(PSQL_HINT)
    assert int(hint[2]) == port
    conninfo = hint[1]

    r = _psql(conninfo, "select current_user")
    assert r.returncode == 0, (r.stderr, d.output())
    assert r.stdout.strip() == "postgres"
    r = _psql(
        conninfo,
        "CREATE TABLE demo_check (id int PRIMARY KEY, name text); "
        "INSERT INTO demo_check VALUES (1, 'alloy'), (2, 'db'); "
        "SELECT string_agg(name, ',' ORDER BY id) FROM demo_check",
    )
    assert r.returncode == 0, (r.stderr, d.output())
    assert r.stdout.splitlines()[-1] == "alloy,db", r.stdout

    d.signal_group(signal.SIGINT)  # Ctrl-C
    rc = d.finish()
    out = d.output()
    assert rc == 0, out
    assert _gone(proxy_pid), out
    assert _gone(emulator_pid), out
    assert _refused(pg_host, pg_port), "the throwaway PostgreSQL still listens"
    assert _refused("127.0.0.1", port), "the proxy still listens"
    assert "demo: stopped" in out
    _assert_clean(out)


def test_demo_busy_port_is_one_clear_line(demos: list[DemoRun]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = int(busy.getsockname()[1])
        d = _start(demos, port)
        rc = d.finish()
    out = d.output()
    assert rc == 1, out
    errors = [ln for ln in out.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, out
    assert errors[0].startswith("demo: error: "), out
    assert f"127.0.0.1:{port}" in errors[0] and "in use" in errors[0], out
    assert "starting the AlloyDB emulator" not in out  # refused before PostgreSQL is started
    _assert_clean(out)


def test_demo_proxy_flag_error_stops_the_emulator(demos: list[DemoRun]) -> None:
    """Flags after ``--`` go to the proxy; when it refuses them, the proxy's own line, then one
    demo line, exit 1, and the emulator (and its PostgreSQL) stopped."""
    d = _start(demos, free_port(), "--", "--no-such-flag")
    emu = d.wait_for(EMULATOR_READY)
    rc = d.finish()
    out = d.output()
    assert rc == 1, out
    assert "fastproxy: error: unrecognized arguments: --no-such-flag" in out
    assert out.rstrip().splitlines()[-1] == (
        "demo: error: the proxy exited (exit code 1) before it was ready; stopped the emulator"
    )
    assert _gone(int(emu[1])), out
    assert _refused(emu[2], int(emu[3]))
    _assert_clean(out)


@pytest.mark.parametrize(
    ("victim", "last_line"),
    [
        ("proxy", "the proxy exited on its own (exit code 143); stopped the emulator"),
        ("emulator", "the emulator exited on its own (exit code 0); stopped the proxy"),
    ],
)
def test_demo_child_dying_stops_the_other(
    demos: list[DemoRun], victim: str, last_line: str
) -> None:
    d = _start(demos, free_port())
    emu = d.wait_for(EMULATOR_READY)
    pids = {"emulator": int(emu[1]), "proxy": int(d.wait_for(PROXY_READY)[1])}
    d.wait_for(PSQL_HINT)
    os.kill(pids[victim], signal.SIGTERM)  # not through the demo
    rc = d.finish()
    out = d.output()
    assert rc == 1, out
    assert out.rstrip().splitlines()[-1] == f"demo: error: {last_line}"
    assert all(_gone(pid) for pid in pids.values()), out
    assert _refused(emu[2], int(emu[3]))
    _assert_clean(out)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--port", "abc"], "argument --port: invalid int value: 'abc'"),
        (["--port", "70000"], "--port must be a port number (0-65535), not 70000"),
        (["--address", "localhost"], "--address is not a valid IP address: 'localhost'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_demo_usage_errors(args: list[str], needle: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "fastproxy.demo", *args],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        timeout=60,
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.splitlines() == [f"fastproxy demo: error: {needle}"]


def test_psql_command() -> None:
    assert demo.psql_command("127.0.0.1", 5432) == (
        'psql "host=127.0.0.1 port=5432 user=postgres sslmode=disable"'
    )
    assert demo.psql_command("0.0.0.0", 6000).startswith('psql "host=127.0.0.1 port=6000 ')
    assert demo.psql_command("::", 6000).startswith('psql "host=::1 port=6000 ')


def test_parse_args_splits_proxy_flags() -> None:
    argv = ["--port", "6543", "--", "--debug-logs", "--max-connections", "5"]
    opts, extra = demo.parse_args(argv)
    assert (opts.port, opts.address) == (6543, "127.0.0.1")
    assert extra == ["--debug-logs", "--max-connections", "5"]
