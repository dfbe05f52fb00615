"""``fastproxy demo``: the AlloyDB emulator with a throwaway PostgreSQL, and the proxy in front.

Two child processes, each in its own process group so that a Ctrl-C in the terminal reaches only
this one, which then stops them in order: the proxy first, then the emulator (which stops and
removes its PostgreSQL). On Linux each child also gets SIGTERM should this process die without
cleaning up (``PR_SET_PDEATHSIG``), so not even ``kill -9`` leaves a database behind.

Every wait is bounded; every failure is one ``demo: error:`` line and exit code 1 (a child's own
output comes first when it explains the failure). SIGINT, SIGTERM and SIGHUP stop everything and
exit 0; a second Ctrl-C while stopping cuts the proxy's drain short.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

DEMO_URI = (
    "projects/demo-project/locations/us-central1/clusters/demo-cluster/instances/demo-primary"
)
DB_USER = "postgres"  # the demo token's IAM principal, hence its database role
DEFAULT_PORT = 5432
DEFAULT_ADDRESS = "127.0.0.1"
EMULATOR_READY_TIMEOUT_S = 120.0
PROXY_READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
READER_JOIN_S = 5.0
POLL_S = 0.1
TAIL_LINES = 40
READY_TEXT = "The proxy has started successfully"
_LISTENING = re.compile(r"Listening on (\S+):(\d+) for ")
_EMULATOR_NOTEWORTHY = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback|^emulator: error")

# Run as ``python -c`` in front of each child: ask the kernel for SIGTERM when the demo dies,
# then exec the real command (the setting survives exec). argv: parent pid, program, args...
_WITH_PDEATHSIG = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG\n"
    "except (AttributeError, OSError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)  # the demo died before prctl took effect\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class _UsageError(Exception):
    pass


class _Failure(Exception):
    """Ends the demo with exit code 1 and this message as its last line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fastproxy demo",
        description="Start the AlloyDB emulator with its own throwaway PostgreSQL and fastproxy "
        "in front of it, print the psql command line, and stop everything on Ctrl-C. Extra "
        "proxy flags go after '--'.",
        usage="fastproxy demo [--port PORT] [--address ADDRESS] [-- PROXY_FLAG...]",
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="the proxy's port (default %(default)s; 0 = any free port)",
    )
    p.add_argument(
        "--address", default=DEFAULT_ADDRESS, help="the proxy's address (default %(default)s)"
    )
    return p


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The demo's own flags, and the proxy flags given after ``--``."""
    args = list(argv)
    extra: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, extra = args[:cut], args[cut + 1 :]
    opts = build_parser().parse_args(args)
    if not 0 <= opts.port <= 65535:
        raise _UsageError(f"--port must be a port number (0-65535), not {opts.port}")
    try:
        ipaddress.ip_address(opts.address)
    except ValueError:
        raise _UsageError(f"--address is not a valid IP address: {opts.address!r}") from None
    return opts, extra


def psql_command(address: str, port: int) -> str:
    """The psql line to print; a wildcard address is reached through loopback."""
    ip = ipaddress.ip_address(address)
    host = address
    if ip.is_unspecified:
        host = "::1" if ip.version == 6 else "127.0.0.1"
    return f'psql "host={host} port={port} user={DB_USER} sslmode=disable"'


def port_problem(address: str, port: int) -> str | None:
    """Why the proxy could not listen on ``address:port`` (None: it can), checked before the
    emulator's PostgreSQL spends seconds starting. Binds as the proxy does (SO_REUSEADDR)."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _say(text: str, stream: IO[str] | None = None) -> None:
    out = stream or sys.stdout
    try:
        out.write(f"demo: {text}\n")
        out.flush()
    except (OSError, ValueError):
        pass  # our own output is gone (closed pipe): nothing left to tell


def _echo(line: str, stream: IO[str]) -> None:
    try:
        stream.write(line if line.endswith("\n") else line + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass


class _Child:
    """A child process whose output lines are read on threads, kept (the last few) and passed to
    ``on_line``."""

    def __init__(self, name: str, argv: list[str], on_line: Callable[[str, bool], None]) -> None:
        self.name = name
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._on_line = on_line
        command = argv
        if sys.platform.startswith("linux"):
            command = [sys.executable, "-c", _WITH_PDEATHSIG, str(os.getpid()), *argv]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=env,
            process_group=0,  # Ctrl-C in the terminal reaches the demo only
        )
        self._threads = [
            threading.Thread(
                target=self._read,
                args=(stream, is_err),
                name=f"demo-{name}-{'stderr' if is_err else 'stdout'}",
                daemon=True,
            )
            for stream, is_err in ((self.proc.stdout, False), (self.proc.stderr, True))
        ]
        for t in self._threads:
            t.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, stream: IO[str] | None, is_err: bool) -> None:
        if stream is None:
            return
        with contextlib.suppress(OSError, ValueError):
            for line in stream:
                self.tail.append(line)
                self._on_line(line, is_err)

    def join_readers(self) -> None:
        """Wait until everything the child wrote has been passed on (it has exited)."""
        for t in self._threads:
            t.join(READER_JOIN_S)

    def print_tail(self) -> None:
        self.join_readers()
        for line in self.tail:
            _echo(line, sys.stderr)


class _Signals:
    """Records SIGINT/SIGTERM/SIGHUP; the main thread acts on them."""

    HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.event = threading.Event()
        self.count = 0
        self.last: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:  # None: installed from outside Python; leave ours
                signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1
        self.last = signum
        self.event.set()

    def name(self) -> str:
        return signal.Signals(self.last).name if self.last is not None else "a signal"


class Demo:
    def __init__(self, opts: argparse.Namespace, extra: list[str]) -> None:
        self.address: str = opts.address
        self.port: int = opts.port
        self.extra = extra
        self.signals = _Signals()
        self.emulator: _Child | None = None
        self.proxy: _Child | None = None
        self._emulator_ready = False
        self._proxy_ready = threading.Event()
        self._proxy_port: int | None = None

    # -- output of the children ------------------------------------------------------------
    def _emulator_line(self, line: str, is_err: bool) -> None:
        # Its start-up banner names a token and a proxy command line of its own: not echoed, as
        # the demo prints what to run. Later, only what is worth a look.
        if self._emulator_ready and _EMULATOR_NOTEWORTHY.search(line):
            _echo(line, sys.stderr)

    def _proxy_line(self, line: str, is_err: bool) -> None:
        _echo(line, sys.stderr if is_err else sys.stdout)
        if is_err:
            return
        m = _LISTENING.search(line)
        if m and self._proxy_port is None:
            self._proxy_port = int(m.group(2))
        if READY_TEXT in line:
            self._proxy_ready.set()

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> int:
        self.signals.install()
        workdir: Path | None = None
        try:
            workdir = Path(tempfile.mkdtemp(prefix="fastproxy-demo-"))
            code = self._run(workdir)
        except _Failure as exc:
            self._stop_all()
            _say(f"error: {exc}", sys.stderr)
            code = 1
        except OSError as exc:  # e.g. no room for the temporary directory or a process
            self._stop_all()
            _say(f"error: {exc.strerror or exc}", sys.stderr)
            code = 1
        finally:
            self._stop_all()
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            self.signals.restore()
        return code

    def _run(self, workdir: Path) -> int:
        problem = port_problem(self.address, self.port)
        if problem is not None:
            raise _Failure(
                f"cannot listen on {self.address}:{self.port}: {problem} "
                "(choose another port: PORT=N scripts/demo, or fastproxy demo --port N)"
            )
        token = "demo-" + secrets.token_urlsafe(18)
        ready_file = workdir / "ready.json"
        _say("starting the AlloyDB emulator with a throwaway PostgreSQL (a few seconds)")
        self.emulator = _Child(
            "emulator",
            [
                sys.executable,
                "-m",
                "fastproxy.emulator",
                "--token",
                f"{token}={DB_USER}",
                "--ready-file",
                str(ready_file),
            ],
            self._emulator_line,
        )
        info = self._wait_for_emulator(ready_file)
        if info is None:
            return self._stop_on_signal()
        endpoint = str(info["admin_endpoint"])
        _say(
            f"emulator ready (pid {self.emulator.pid}): Admin API {endpoint}, PostgreSQL "
            f"{info['host']}:{info['port']} (removed on exit)"
        )

        _say(f"starting fastproxy on {self.address}:{self.port}")
        self.proxy = _Child(
            "proxy",
            [
                sys.executable,
                "-m",
                "fastproxy",
                "--alloydbadmin-api-endpoint",
                endpoint,
                "--token",
                token,
                "--auto-iam-authn",
                "--address",
                self.address,
                "--port",
                str(self.port),
                *self.extra,
                DEMO_URI,
            ],
            self._proxy_line,
        )
        if not self._wait_for_proxy():
            return self._stop_on_signal()
        port = self._proxy_port if self._proxy_port is not None else self.port
        _say(f"proxy ready (pid {self.proxy.pid}). In another terminal:")
        print(f"\n    {psql_command(self.address, port)}\n", flush=True)
        _say(
            f'no password needed: the demo token maps to the IAM principal "{DB_USER}" and the '
            "proxy runs with --auto-iam-authn (IAM database authentication, as on AlloyDB). "
            "Ctrl-C stops everything and removes the throwaway database."
        )

        while not self.signals.event.wait(POLL_S):
            if self.proxy.proc.poll() is not None:
                self.proxy.join_readers()
                raise _Failure(
                    f"the proxy exited on its own (exit code {self.proxy.proc.returncode}); "
                    "stopped the emulator"
                )
            if self.emulator.proc.poll() is not None:
                self.emulator.print_tail()
                raise _Failure(
                    f"the emulator exited on its own (exit code {self.emulator.proc.returncode}"
                    "); stopped the proxy"
                )
        return self._stop_on_signal()

    def _wait_for_emulator(self, ready_file: Path) -> dict[str, Any] | None:
        """The ready file's content; None if a signal came first."""
        assert self.emulator is not None
        deadline = time.monotonic() + EMULATOR_READY_TIMEOUT_S
        while True:
            if ready_file.exists():
                try:
                    info: dict[str, Any] = json.loads(ready_file.read_text())
                except (OSError, ValueError) as exc:
                    raise _Failure(f"cannot read the emulator's ready file: {exc}") from None
                self._emulator_ready = True
                return info
            if self.emulator.proc.poll() is not None:
                self.emulator.print_tail()
                raise _Failure(
                    f"the emulator exited (exit code {self.emulator.proc.returncode}) before it "
                    "was ready; its output is above"
                )
            if time.monotonic() > deadline:
                self.emulator.print_tail()
                raise _Failure(
                    f"the emulator was not ready after {EMULATOR_READY_TIMEOUT_S:.0f} s; stopped it"
                )
            if self.signals.event.wait(POLL_S):
                return None

    def _wait_for_proxy(self) -> bool:
        """True once the proxy printed its ready line; False if a signal came first."""
        assert self.proxy is not None
        deadline = time.monotonic() + PROXY_READY_TIMEOUT_S
        while not self._proxy_ready.wait(POLL_S):
            if self.proxy.proc.poll() is not None:
                self.proxy.join_readers()  # its own error line first
                if self._proxy_ready.is_set():
                    break
                raise _Failure(
                    f"the proxy exited (exit code {self.proxy.proc.returncode}) before it was "
                    "ready; stopped the emulator"
                )
            if time.monotonic() > deadline:
                raise _Failure(
                    f"the proxy was not ready after {PROXY_READY_TIMEOUT_S:.0f} s; stopped it"
                )
            if self.signals.event.is_set():
                return False
        if self.proxy.proc.poll() is not None:
            raise _Failure(
                f"the proxy exited (exit code {self.proxy.proc.returncode}) right after "
                "starting; stopped the emulator"
            )
        return True

    # -- stopping ----------------------------------------------------------------------------
    def _stop_on_signal(self) -> int:
        _say(f"received {self.signals.name()}: stopping the proxy, then the emulator")
        self._stop_all(verbose=True)
        _say("stopped; the throwaway database is removed")
        return 0

    def _stop_all(self, verbose: bool = False) -> None:
        if self.proxy is not None:
            self._stop(self.proxy, verbose)
        if self.emulator is not None:
            self._stop(self.emulator, verbose)

    def _stop(self, child: _Child, verbose: bool) -> None:
        if child.proc.poll() is None:
            if verbose:
                _say(f"stopping the {child.name} (pid {child.pid})")
            child.proc.send_signal(signal.SIGTERM)
            seen = self.signals.count
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while True:
                try:
                    child.proc.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if self.signals.count != seen:  # another Ctrl-C: cut the drain short
                    seen = self.signals.count
                    with contextlib.suppress(OSError):
                        child.proc.send_signal(signal.SIGINT)
                if time.monotonic() > deadline:
                    _say(
                        f"the {child.name} did not stop within {STOP_TIMEOUT_S:.0f} s; killing it",
                        sys.stderr,
                    )
                    child.proc.kill()
                    child.proc.wait()
                    break
        child.join_readers()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts, extra = parse_args(sys.argv[1:] if argv is None else argv)
    except _UsageError as exc:
        print(f"fastproxy demo: error: {exc}", file=sys.stderr)
        return 1
    return Demo(opts, extra).run()


if __name__ == "__main__":
    sys.exit(main())
