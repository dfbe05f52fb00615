"""Fixtures shared by the whole suite: a real PostgreSQL and the AlloyDB emulator as processes.

Servers are waited on by readiness (a ready file, a protocol answer), never by sleeping a fixed
time, and always torn down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from fastproxy.emulator.backend import ThrowawayPostgres

# CI runs a few hundred examples per property; HYPOTHESIS_PROFILE=fuzz is the dedicated run.
settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile(
    "fuzz",
    max_examples=100_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parent.parent

# Application Default Credentials would probe the GCE metadata server (a link-local address) when
# nothing else is configured; tests only ever talk to loopback, so turn that probe off for this
# process and every process it starts.
os.environ["NO_GCE_CHECK"] = "True"
os.environ["GCE_METADATA_HOST"] = "127.0.0.1:9"
os.environ["GCE_METADATA_IP"] = "127.0.0.1:9"
READY_TIMEOUT_S = 90.0


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> int:
    """Send ``sig`` unless ``proc`` has exited; kill it if it is still running 30 s later.
    Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


@pytest.fixture(scope="session")
def postgres() -> Iterator[ThrowawayPostgres]:
    """A real PostgreSQL server for the whole session (superuser postgres/postgres)."""
    with ThrowawayPostgres() as pg:
        yield pg


@dataclass
class EmulatorProcess:
    proc: subprocess.Popen[bytes]
    info: dict[str, Any]
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def admin_endpoint(self) -> str:
        return str(self.info["admin_endpoint"])

    @property
    def token(self) -> str:
        return str(self.info["tokens"][0]["token"])

    def instance(self, n: int = 0) -> dict[str, Any]:
        return dict(self.info["instances"][n])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        return stop_process(self.proc)


def start_emulator_process(tmp_path: Path, *args: str) -> EmulatorProcess:
    ready = tmp_path / f"emulator-ready-{time.monotonic_ns()}.json"
    log_path = tmp_path / f"emulator-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastproxy.emulator", "--ready-file", str(ready), *args],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
        )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"emulator exited early: {log_path.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"emulator not ready in time: {log_path.read_text()}")
        time.sleep(0.02)
    info = json.loads(ready.read_text())
    return EmulatorProcess(proc=proc, info=info, log_path=log_path)


@pytest.fixture
def emulator_factory(
    tmp_path: Path,
) -> Iterator[Callable[..., EmulatorProcess]]:
    """Start emulators with custom flags; every one is stopped at the end of the test."""
    started: list[EmulatorProcess] = []

    def start(*args: str) -> EmulatorProcess:
        emu = start_emulator_process(tmp_path, *args)
        started.append(emu)
        return emu

    yield start
    for emu in started:
        emu.stop()


@pytest.fixture(scope="session")
def emulator_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    """One emulator with its own throwaway PostgreSQL for the session.

    Tokens: ``native-token`` (alice@example.com) and ``iam-token`` (an IAM service account whose
    database user is ``iam-sa@demo-project.iam``); ``forbidden-token`` maps to a principal that
    gets 403 on the demo cluster.
    """
    tmp = tmp_path_factory.mktemp("emulator-pg")
    emu = start_emulator_process(
        tmp,
        "--token",
        "native-token=alice@example.com",
        "--token",
        "iam-token=iam-sa@demo-project.iam.gserviceaccount.com",
        "--token",
        "forbidden-token=mallory@example.com",
        "--forbid",
        "mallory@example.com=projects/demo-project/locations/us-central1/clusters/demo-cluster",
    )
    yield emu
    emu.stop()


def echo_emulator(tmp: Path, token: str) -> Iterator[EmulatorProcess]:
    """For a fixture to ``yield from``: an emulator with the echo backend that accepts ``token``
    (``TOKEN=PRINCIPAL``), stopped at teardown."""
    emu = start_emulator_process(tmp, "--backend", "echo", "--token", token)
    yield emu
    emu.stop()


@pytest.fixture(scope="session")
def emulator_echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    """One emulator with the echo backend for the session."""
    tmp = tmp_path_factory.mktemp("emulator-echo")
    yield from echo_emulator(tmp, "echo-token=echo@example.com")


@dataclass
class ProxyProcess:
    proc: subprocess.Popen[str]
    ports: list[int]
    lines: list[str]
    drainer: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.ports[0]

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        rc = stop_process(self.proc, sig)
        if self.drainer is not None:
            self.drainer.join(timeout=10)
        return rc


def start_proxy_process(*args: str, timeout: float = 60.0) -> ProxyProcess:
    """Start ``python -m fastproxy ARGS`` and wait for its ready line; ports are read back from
    its "Listening on" lines (pass ``--port 0`` to let the OS choose)."""
    import re
    import selectors

    proc = subprocess.Popen(
        [sys.executable, "-m", "fastproxy", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(REPO),
    )
    assert proc.stdout is not None
    lines: list[str] = []
    ports: list[int] = []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                proc.kill()
                raise RuntimeError("proxy not ready in time:\n" + "".join(lines))
            if not sel.select(remaining):
                continue
            line = proc.stdout.readline()
            if not line:
                proc.wait()
                raise RuntimeError(f"proxy exited ({proc.returncode}):\n" + "".join(lines))
            lines.append(line)
            m = re.search(r"Listening on \S+:(\d+) ", line)
            if m:
                ports.append(int(m.group(1)))
            if "ready for new connections" in line:
                break
    finally:
        sel.close()

    # Keep draining output in the background so the proxy never blocks on a full pipe.
    def drain() -> None:
        assert proc.stdout is not None
        for ln in proc.stdout:
            lines.append(ln)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    return ProxyProcess(proc, ports, lines, drainer)


@pytest.fixture
def proxy_factory() -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def start(*args: str) -> ProxyProcess:
        p = start_proxy_process(*args)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()
