"""``fastproxy wait`` and ``fastproxy shutdown`` against tiny local HTTP servers on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fastproxy.__main__ import main

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Recorder:
    """What the fake proxy answers (``statuses`` in turn, the last one repeated) and saw."""

    statuses: list[int]
    requests: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_status(self, method: str, path: str) -> int:
        with self.lock:
            self.requests.append((method, path))
            return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]


@dataclass
class FakeServer:
    port: int
    recorder: Recorder


@pytest.fixture
def serve() -> Iterator[Callable[[list[int]], FakeServer]]:
    servers: list[ThreadingHTTPServer] = []

    def start(statuses: list[int]) -> FakeServer:
        recorder = Recorder(list(statuses))

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                status = recorder.next_status(self.command, self.path)
                body = b"ok" if status == 200 else b"not yet"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = _answer
            do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return FakeServer(server.server_address[1], recorder)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so nobody else takes it), no listen."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastproxy", *argv],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def one_line_error(code: int, out: str, err: str, needle: str) -> None:
    assert code == 1, (out, err)
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastproxy: error: ") and needle in lines[0], lines[0]


# --- wait ------------------------------------------------------------------------------------


def test_wait_until_startup_answers_200(serve: Callable[[list[int]], FakeServer]) -> None:
    server = serve([503, 503, 200])
    proc = run("wait", "--http-address", "127.0.0.1", "--http-port", str(server.port), "-m", "20s")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert server.recorder.requests == [("GET", "/startup")] * 3


def test_wait_ignores_http_proxy_settings(
    serve: Callable[[list[int]], FakeServer], closed_port: int
) -> None:
    """A health probe of a local server must not go through HTTP_PROXY (Go never proxies
    loopback); the proxy named here refuses connections, so using it would fail."""
    server = serve([200])
    dead_proxy = f"http://127.0.0.1:{closed_port}"
    env = {"http_proxy": dead_proxy, "HTTP_PROXY": dead_proxy, "no_proxy": "", "NO_PROXY": ""}
    proc = run("wait", "--http-address", "127.0.0.1", "--http-port", str(server.port), env=env)
    assert proc.returncode == 0, proc.stderr
    assert server.recorder.requests == [("GET", "/startup")]


def test_wait_never_ready(serve: Callable[[list[int]], FakeServer]) -> None:
    server = serve([503])
    started = time.monotonic()
    proc = run("wait", "--http-address", "127.0.0.1", "--http-port", str(server.port), "--max=2s")
    elapsed = time.monotonic() - started
    one_line_error(proc.returncode, proc.stdout, proc.stderr, "the proxy did not start within 2s")
    assert f"http://127.0.0.1:{server.port}/startup: HTTP 503" in proc.stderr
    assert len(server.recorder.requests) >= 2  # it polled, more than once
    assert elapsed < 15


def test_wait_nothing_listening(closed_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["wait", "--http-address", "127.0.0.1", "--http-port", str(closed_port), "-m", "1s"]
    )
    captured = capsys.readouterr()
    one_line_error(code, captured.out, captured.err, "the proxy did not start within 1s")
    assert "Connection refused" in captured.err


def test_wait_nothing_listening_process(closed_port: int) -> None:
    proc = run("wait", "--http-port", str(closed_port), "--max", "0")
    one_line_error(proc.returncode, proc.stdout, proc.stderr, "did not start within 0")


@pytest.fixture
def garbage_port() -> Iterator[int]:
    """Something else on the port, answering a non-HTTP banner to every connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def answer_garbage() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    threading.Thread(target=answer_garbage, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def test_wait_not_http(garbage_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    """A clear line (the peer's banner is not echoed, it may hold line breaks), no traceback."""
    port = str(garbage_port)
    code = main(["wait", "--http-address", "127.0.0.1", "--http-port", port, "-m", "1s"])
    captured = capsys.readouterr()
    one_line_error(code, captured.out, captured.err, "the proxy did not start within 1s")
    assert "not an HTTP response (BadStatusLine)" in captured.err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--max", "10"], "invalid duration '10'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--http-port", "abc"], "invalid int value: 'abc'"),
        (["--http-port", "70000"], "--http-port must be a port number"),
        (["--ma", "1s"], "unrecognized arguments: --ma"),
    ],
    ids=["duration", "unknown-flag", "bad-port", "port-range", "abbreviation"],
)
def test_wait_usage_errors(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["wait", *argv])
    captured = capsys.readouterr()
    one_line_error(code, captured.out, captured.err, needle)


# --- shutdown --------------------------------------------------------------------------------


def test_shutdown_posts_quitquitquit(serve: Callable[[list[int]], FakeServer]) -> None:
    server = serve([200])
    proc = run("shutdown", "--admin-port", str(server.port))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert server.recorder.requests == [("POST", "/quitquitquit")]


def test_shutdown_ignores_http_proxy_settings(
    serve: Callable[[list[int]], FakeServer], closed_port: int
) -> None:
    server = serve([200])
    dead_proxy = f"http://127.0.0.1:{closed_port}"
    env = {"http_proxy": dead_proxy, "HTTP_PROXY": dead_proxy, "no_proxy": "", "NO_PROXY": ""}
    proc = run("shutdown", "--admin-port", str(server.port), env=env)
    assert proc.returncode == 0, proc.stderr
    assert server.recorder.requests == [("POST", "/quitquitquit")]


def test_shutdown_nothing_listening(closed_port: int) -> None:
    proc = run("shutdown", "--admin-port", str(closed_port))
    url = f"http://127.0.0.1:{closed_port}/quitquitquit"
    one_line_error(
        proc.returncode,
        proc.stdout,
        proc.stderr,
        f"failed to send shutdown request to {url}: Connection refused",
    )


@pytest.mark.parametrize("status", [400, 404, 500])
def test_shutdown_refused(
    serve: Callable[[list[int]], FakeServer], status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """E.g. a proxy started without --quitquitquit answers 404."""
    server = serve([status])
    code = main(["shutdown", "--admin-port", str(server.port)])
    captured = capsys.readouterr()
    one_line_error(code, captured.out, captured.err, f"shutdown request failed: HTTP {status}")
    assert server.recorder.requests == [("POST", "/quitquitquit")]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--admin-port", "x"], "invalid int value: 'x'"),
        (["--admin-port", "0"], "--admin-port must be a port number"),
        (["--port", "1"], "unrecognized arguments: --port"),
    ],
    ids=["bad-port", "port-zero", "unknown-flag"],
)
def test_shutdown_usage_errors(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["shutdown", *argv])
    captured = capsys.readouterr()
    one_line_error(code, captured.out, captured.err, needle)


def test_shutdown_not_http(garbage_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["shutdown", "--admin-port", str(garbage_port)])
    captured = capsys.readouterr()
    one_line_error(code, captured.out, captured.err, "not an HTTP response (BadStatusLine)")
