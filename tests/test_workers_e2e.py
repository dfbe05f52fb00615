"""``--workers 2``: both processes accept (SO_REUSEPORT), each keeps its own certificates fresh
through the Admin API, and a shutdown signal reaches every worker."""

from __future__ import annotations

import collections
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.conftest import EmulatorProcess, ProxyProcess, start_proxy_process
from tests.e2e_support import DEMO_URI, echo_once, static_args, write_static_info
from tests.inproc_support import ECHO_TOKEN


def _served(out: str) -> dict[int, int]:
    return {int(w): int(n) for w, n in re.findall(r"Worker (\d+) served (\d+) connections", out)}


def _worker_pids(proxy: ProxyProcess) -> list[int]:
    children = Path(f"/proc/{proxy.proc.pid}/task/{proxy.proc.pid}/children").read_text().split()
    return [proxy.proc.pid, *map(int, children)]


@pytest.mark.e2e
def test_two_workers_share_the_port_and_both_accept(
    emulator_echo: EmulatorProcess, tmp_path: Path
) -> None:
    static = write_static_info(emulator_echo, ECHO_TOKEN, tmp_path / "static.json")
    proxy = start_proxy_process(*static_args(static, ECHO_TOKEN), "--workers", "2")
    try:
        assert len(_worker_pids(proxy)) == 2
        for i in range(80):
            payload = f"connection {i}".encode() * 50
            assert echo_once(proxy.port, payload) == payload
        rc = proxy.stop(signal.SIGTERM)
    finally:
        proxy.stop(signal.SIGKILL)
    out = proxy.output()
    assert rc == 143, out
    served = _served(out)
    assert set(served) == {0, 1}, out
    assert served[0] > 0 and served[1] > 0, served
    assert served[0] + served[1] == 80, served
    assert "Traceback" not in out
    assert out.count("Received SIGTERM, shutting down") == 2  # each worker drained


@pytest.mark.e2e
@pytest.mark.slow
def test_certificate_rotation_reaches_every_worker(
    emulator_factory: Callable[..., EmulatorProcess],
) -> None:
    """20 s certificates: within ~50 s each worker (its own key) gets several from the Admin
    API, and connections through both keep working after the first ones expired."""
    emu = emulator_factory(
        "--backend", "echo", "--token", "t=u@example.com", "--cert-lifetime", "20"
    )
    proxy = start_proxy_process(
        DEMO_URI,
        "--alloydbadmin-api-endpoint",
        emu.admin_endpoint,
        "--token",
        "t",
        "--port",
        "0",
        "--workers",
        "2",
    )
    failures: list[str] = []
    count = 0
    try:
        end = time.monotonic() + 50
        while time.monotonic() < end:
            payload = f"rotation {count}".encode() * 100
            try:
                if echo_once(proxy.port, payload) != payload:
                    failures.append(f"corrupted echo {count}")
            except OSError as exc:
                failures.append(repr(exc))
            count += 1
            time.sleep(0.1)
        rc = proxy.stop(signal.SIGTERM)
    finally:
        proxy.stop(signal.SIGKILL)
    out = proxy.output()
    assert not failures, failures[:5]
    assert rc == 143, out
    log = requests.get(f"{emu.admin_endpoint}/_emulator/requests", timeout=30).json()["requests"]
    per_key: collections.Counter[str] = collections.Counter()
    for entry in log:
        if entry["path"].endswith(":generateClientCertificate") and entry["status"] == 200:
            per_key[entry["body"]["publicKey"]] += 1
    assert len(per_key) == 2, per_key.values()  # one key per worker
    assert all(n >= 2 for n in per_key.values()), list(per_key.values())  # each one rotated
    served = _served(out)
    assert served.get(0, 0) > 0 and served.get(1, 0) > 0, served
