"""Scale: 9,500 concurrent connections held open through one proxy process, each used once.

The hard descriptor limit here is 20,000 per process and a proxied connection takes two in the
proxy (client + upstream), so 9,500 is the most one process can hold with room for its listeners.
RSS before and after is printed (measured, not asserted as a timing).
"""

from __future__ import annotations

import os
import resource
import selectors
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import EmulatorProcess, ProxyProcess
from tests.e2e_support import DEMO_URI, fd_count, rss_kib, write_static_info

CONNECTIONS = int(os.environ.get("FASTPROXY_SCALE_CONNECTIONS", "9500"))
DEADLINE_S = 600.0


@pytest.mark.slow
@pytest.mark.e2e
def test_hold_9500_connections_and_use_each_once(
    emulator_echo: EmulatorProcess, proxy_factory: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    assert hard >= CONNECTIONS + 200, f"this test needs {CONNECTIONS + 200} descriptors"
    static = write_static_info(emulator_echo, "echo-token", tmp_path / "static.json")
    proxy = proxy_factory(
        DEMO_URI, "--static-connection-info", str(static), "--token", "echo-token",
        "--port", "0",
    )
    pid = proxy.proc.pid
    rss_before = rss_kib(pid)

    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    pending: dict[int, bytes] = {}
    received: dict[int, bytearray] = {}
    deadline = time.monotonic() + DEADLINE_S
    try:
        for i in range(CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=60)
            s.setblocking(False)
            socks.append(s)
            token = b"%08d" % i
            s.send(token)  # 8 bytes always fit an empty socket buffer
            pending[s.fileno()] = token
            received[s.fileno()] = bytearray()
            sel.register(s, selectors.EVENT_READ)
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                fd = sock.fileno()
                data = sock.recv(64)
                assert data, f"connection {fd} closed before its echo"
                received[fd] += data
                if len(received[fd]) >= 8:
                    assert bytes(received[fd]) == pending.pop(fd)
                    sel.unregister(sock)
        assert not pending, f"{len(pending)} connections never echoed"
        # Every connection is still open and spliced: the proxy holds two descriptors for each.
        held = fd_count(pid)
        rss_after = rss_kib(pid)
        assert held >= 2 * CONNECTIONS
        per_conn = (rss_after - rss_before) * 1024 / CONNECTIONS
        print(
            f"\nscale: {CONNECTIONS} concurrent connections; proxy RSS {rss_before} KiB before, "
            f"{rss_after} KiB with all open ({per_conn:.0f} bytes per connection); "
            f"{held} descriptors"
        )
    finally:
        sel.close()
        for s in socks:
            s.close()
    assert proxy.proc.poll() is None, proxy.output()[-2000:]
