"""The health and metrics server: handler semantics with a fake status source, and end to end."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from fastproxy.errors import ConfigError
from fastproxy.health import HealthServer, HealthState, render_metrics
from tests.conftest import EmulatorProcess, ProxyProcess
from tests.e2e_support import DEMO_URI, write_static_info


class FakeSource:
    def __init__(self, max_connections: int = 0, **stats: int) -> None:
        self.max_connections = max_connections
        self.is_stopping = False
        self.counters: dict[str, Any] = {"active": 0, **stats}

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)


SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\})? (\S+)')


def parse_metrics(text: str) -> tuple[dict[str, float], dict[str, str], set[str]]:
    """A tiny Prometheus text parser: samples by ``name{labels}``, TYPE by name, HELP names."""
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    helps: set[str] = set()
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
            continue
        assert not line.startswith("#"), line
        m = SAMPLE.fullmatch(line)
        assert m, f"unparseable line: {line!r}"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    for key in samples:
        name = key.split("{", 1)[0]
        assert name in types, f"no TYPE for {name}"
        assert name in helps, f"no HELP for {name}"
    return samples, types, helps


@pytest.fixture
def server() -> Iterator[Callable[..., tuple[HealthServer, str]]]:
    started: list[HealthServer] = []

    def start(**kw: Any) -> tuple[HealthServer, str]:
        state = HealthState(
            health_check=kw.pop("health_check", True), prometheus=kw.pop("prometheus", True), **kw
        )
        srv = HealthServer("127.0.0.1", 0, state)
        srv.start()
        started.append(srv)
        return srv, f"http://127.0.0.1:{srv.port}"

    yield start
    for srv in started:
        srv.close()


def get(url: str) -> requests.Response:
    return requests.get(url, timeout=10)


def test_startup_liveness_readiness_lifecycle(
    server: Callable[..., tuple[HealthServer, str]],
) -> None:
    srv, base = server()
    assert get(base + "/startup").status_code == 503
    assert get(base + "/liveness").status_code == 200
    r = get(base + "/readiness")
    assert (r.status_code, r.text) == (503, "not started")

    source = FakeSource()
    srv.attach(source)
    srv.mark_started()
    for path in ("/startup", "/liveness", "/readiness"):
        r = get(base + path)
        assert (r.status_code, r.text) == (200, "ok"), path

    source.is_stopping = True
    r = get(base + "/readiness")
    assert (r.status_code, r.text) == (503, "shutting down")
    source.is_stopping = False
    srv.mark_stopping()
    assert get(base + "/readiness").status_code == 503
    assert get(base + "/startup").status_code == 200
    assert get(base + "/liveness").status_code == 200


def test_readiness_at_max_connections(server: Callable[..., tuple[HealthServer, str]]) -> None:
    srv, base = server()
    source = FakeSource(max_connections=2, active=1)
    srv.attach(source)
    srv.mark_started()
    assert get(base + "/readiness").status_code == 200
    source.counters["active"] = 2
    r = get(base + "/readiness")
    assert r.status_code == 503
    assert "max connections" in r.text


def test_unlimited_connections_is_always_ready(
    server: Callable[..., tuple[HealthServer, str]],
) -> None:
    srv, base = server()
    srv.attach(FakeSource(max_connections=0, active=10_000))
    srv.mark_started()
    assert get(base + "/readiness").status_code == 200


def test_unknown_path_and_disabled_endpoints_are_404(
    server: Callable[..., tuple[HealthServer, str]],
) -> None:
    _, base = server()
    assert get(base + "/nope").status_code == 404
    _, health_only = server(prometheus=False)
    assert get(health_only + "/metrics").status_code == 404
    assert get(health_only + "/liveness").status_code == 200
    _, metrics_only = server(health_check=False)
    assert get(metrics_only + "/liveness").status_code == 404
    assert get(metrics_only + "/metrics").status_code == 200


def test_metrics_format_and_values(server: Callable[..., tuple[HealthServer, str]]) -> None:
    srv, base = server()
    srv.attach(
        FakeSource(
            accepted=7,
            active=2,
            closed_ok=4,
            closed_error=1,
            bytes_up=1000,
            bytes_down=2000,
            dial_failures=3,
            pool_in_use=5,
        )
    )
    r = get(base + "/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples, types, _ = parse_metrics(r.text)
    assert samples == {
        "fastproxy_connections_accepted_total": 7,
        'fastproxy_connections_closed_total{result="ok"}': 4,
        'fastproxy_connections_closed_total{result="error"}': 1,
        "fastproxy_bytes_sent_total": 1000,
        "fastproxy_bytes_received_total": 2000,
        "fastproxy_dial_failures_total": 3,
        "fastproxy_connections_active": 2,
        "fastproxy_buffer_pool_slabs_in_use": 5,
    }
    assert types["fastproxy_connections_active"] == "gauge"
    assert types["fastproxy_buffer_pool_slabs_in_use"] == "gauge"
    assert types["fastproxy_connections_accepted_total"] == "counter"
    assert types["fastproxy_connections_closed_total"] == "counter"


def test_metrics_namespace() -> None:
    samples, _, _ = parse_metrics(render_metrics({"accepted": 1}, "myns"))
    assert samples["myns_connections_accepted_total"] == 1
    assert all(k.startswith("myns_") for k in samples)


def test_metrics_before_attach_are_zero(server: Callable[..., tuple[HealthServer, str]]) -> None:
    _, base = server()
    samples, _, _ = parse_metrics(get(base + "/metrics").text)
    assert set(samples.values()) == {0.0}


def test_port_in_use_is_config_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match="cannot listen"):
            HealthServer("127.0.0.1", port, HealthState(health_check=True, prometheus=False))


# --- end to end ----------------------------------------------------------------------------------


def _metric(base: str, name: str) -> float:
    samples, _, _ = parse_metrics(get(base + "/metrics").text)
    return samples[name]


@pytest.mark.e2e
def test_health_and_metrics_end_to_end(
    emulator_echo: EmulatorProcess, proxy_factory: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    static = write_static_info(emulator_echo, "echo-token", tmp_path / "static.json")
    proxy = proxy_factory(
        DEMO_URI,
        "--static-connection-info",
        str(static),
        "--token",
        "echo-token",
        "--port",
        "0",
        "--health-check",
        "--prometheus",
        "--http-port",
        "0",
    )
    m = re.search(r"Health and metrics server listening on (\S+):(\d+)", proxy.output())
    assert m, proxy.output()
    base = f"http://127.0.0.1:{m.group(2)}"
    for path in ("/startup", "/liveness", "/readiness"):
        r = get(base + path)
        assert (r.status_code, r.text) == (200, "ok"), path

    accepted0 = _metric(base, "fastproxy_connections_accepted_total")
    sent0 = _metric(base, "fastproxy_bytes_sent_total")
    payload = b"x" * 10_000
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            assert chunk, "EOF before echo"
            got += chunk
        assert got == payload
    # Byte counters are added when a connection closes, on the loop thread: poll briefly.
    deadline = time.monotonic() + 10
    while _metric(base, "fastproxy_bytes_sent_total") < sent0 + len(payload):
        assert time.monotonic() < deadline, get(base + "/metrics").text
        time.sleep(0.05)
    assert _metric(base, "fastproxy_connections_accepted_total") >= accepted0 + 1
    assert _metric(base, "fastproxy_bytes_received_total") >= len(payload)
    assert proxy.stop() == 0
