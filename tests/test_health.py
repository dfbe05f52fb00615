"""The health and metrics server: handler semantics with a fake status source, the prometheus
collector from fake snapshots, the loop heartbeat, an in-process proxy, and end to end."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from OpenSSL import SSL
from prometheus_client.parser import text_string_to_metric_families

from fastproxy import proxy as proxy_module
from fastproxy.admin import InstanceMaterial
from fastproxy.errors import ConfigError
from fastproxy.health import (
    CONTENT_TYPE_METRICS,
    HealthServer,
    HealthState,
    render,
)
from fastproxy.instance_uri import InstanceURI
from fastproxy.listener import Listener
from fastproxy.proxy import Proxy
from fastproxy.refresh import Refresher, RefreshingSource
from fastproxy.stats import (
    DIAL_BUCKETS,
    LOOP_BUCKETS,
    Histogram,
    InstanceSnapshot,
    MetricsSnapshot,
    RefreshSnapshot,
)
from tests.conftest import EmulatorProcess, ProxyProcess
from tests.e2e_support import (
    DEMO_URI,
    free_port,
    http_status,
    rewrite_address,
    static_args,
    write_static_info,
)
from tests.inproc_support import (
    WAIT_S,
    connect,
    dead_address,
    echo,
    echo_source,
    echo_static_data,
    running_proxy,
    wait_idle,
    wait_until,
)

DEMO_SHORT = InstanceURI.parse(DEMO_URI).short

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class FakeSource:
    def __init__(self, max_connections: int = 0, **stats: int) -> None:
        self.max_connections = max_connections
        self.is_stopping = False
        self.counters: dict[str, Any] = {"active": 0, **stats}
        self.age: float | None = None
        self.snapshot = MetricsSnapshot()

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)

    def heartbeat_age(self) -> float | None:
        return self.age

    def metrics_snapshot(self) -> MetricsSnapshot:
        return self.snapshot


class FakeRefresh:
    def __init__(self, data: dict[str, RefreshSnapshot]) -> None:
        self.data = data

    def metrics_snapshot(self) -> dict[str, RefreshSnapshot]:
        return dict(self.data)


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Samples by (sample name, sorted labels) and types by family name, via prometheus_client."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def value(samples: Samples, name: str, *, default: float | None = None, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    if key not in samples:
        if default is not None:
            return default
        raise KeyError(f"{key} not in {sorted(samples)}")
    return samples[key]


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


def scrape(base: str) -> Samples:
    r = get(base + "/metrics")
    assert r.status_code == 200, r.text
    return parse(r.text)[0]


# --- probes --------------------------------------------------------------------------------------


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


def test_liveness_follows_the_heartbeat_age(
    server: Callable[..., tuple[HealthServer, str]],
) -> None:
    srv, base = server(liveness_threshold=5.0)
    source = FakeSource()
    srv.attach(source)
    source.age = 4.9
    assert get(base + "/liveness").status_code == 200
    source.age = 5.1
    r = get(base + "/liveness")
    assert r.status_code == 503 and "unresponsive" in r.text
    source.age = None  # the loop is not running (not started yet, or stopped)
    assert get(base + "/liveness").status_code == 200


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


def test_port_in_use_is_config_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match="cannot listen"):
            HealthServer("127.0.0.1", port, HealthState(health_check=True, prometheus=False))


# --- the heartbeat of a real loop ----------------------------------------------------------------


def _poll_status(url: str, want: int, timeout: float = WAIT_S) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = get(url)
        if r.status_code == want:
            return r
        assert time.monotonic() < deadline, f"{url} stayed {r.status_code}: {r.text}"
        time.sleep(0.02)


def test_liveness_turns_503_while_the_loop_is_wedged(
    server: Callable[..., tuple[HealthServer, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy_module, "HEARTBEAT_INTERVAL", 0.05)
    srv, base = server(liveness_threshold=0.5)
    proxy = Proxy([])
    srv.attach(proxy)
    proxy.start()
    release = threading.Event()
    try:
        # Idle is not wedged: the periodic timer keeps the heartbeat fresh.
        time.sleep(1.0)
        age = proxy.heartbeat_age()
        assert age is not None and age < 0.5
        assert get(base + "/liveness").status_code == 200

        proxy.loop.call_soon_threadsafe(release.wait, WAIT_S)  # blocks the loop thread
        r = _poll_status(base + "/liveness", 503)
        assert "unresponsive" in r.text
        samples = scrape(base)
        assert value(samples, "fastproxy_loop_heartbeat_age_seconds") > 0.5

        release.set()
        _poll_status(base + "/liveness", 200)
        samples = scrape(base)
        # The wedged iteration was recorded in the last bucket(s) of the iteration histogram.
        assert value(samples, "fastproxy_loop_iteration_seconds_bucket", le="0.25") < value(
            samples, "fastproxy_loop_iteration_seconds_count"
        )
    finally:
        release.set()
        proxy.stop()
        proxy.join(WAIT_S)
    assert proxy.heartbeat_age() is None
    assert get(base + "/liveness").status_code == 200  # a stopped loop is not a wedged one


# --- the collector -------------------------------------------------------------------------------


def _hist(bounds: tuple[float, ...], *values: float) -> Any:
    h = Histogram(bounds)
    for v in values:
        h.observe(v)
    return h.snapshot()


def _fake_snapshot() -> MetricsSnapshot:
    return MetricsSnapshot(
        worker=3,
        active=2,
        closed_ok=4,
        closed_error=1,
        refused={"max_connections": 5, "out_of_fds": 1},
        instances={
            "p.r.c.a": InstanceSnapshot(
                accepted=6,
                bytes_up=1000,
                bytes_down=2000,
                failed={"connect": 2, "tls": 1},
                dial_latency=_hist(DIAL_BUCKETS, 0.003, 0.02, 0.02, 60.0),
                tls_latency=_hist(DIAL_BUCKETS, 0.001),
            ),
            "p.r.c.b": InstanceSnapshot(accepted=1, bytes_up=10, bytes_down=20),
        },
        loop_latency=_hist(LOOP_BUCKETS, 0.00002, 0.0004),
        heartbeat_age=0.25,
        pool_in_use=7,
        pool_capacity=256,
    )


def test_collector_names_types_labels_and_values() -> None:
    refresh = {
        "p.r.c.a": RefreshSnapshot(successes=3, failures=2, expires_at=1_800_000_000.0),
        "p.r.c.b": RefreshSnapshot(successes=0, failures=4, expires_at=None),
    }
    samples, types = parse(render(_fake_snapshot(), refresh))
    assert types == {
        "fastproxy_worker_info": "gauge",
        "fastproxy_connections_active": "gauge",
        "fastproxy_connections_accepted": "counter",
        "fastproxy_connections_refused": "counter",
        "fastproxy_connections_failed": "counter",
        "fastproxy_connections_closed": "counter",
        "fastproxy_bytes_sent": "counter",
        "fastproxy_bytes_received": "counter",
        "fastproxy_dial_latency_seconds": "histogram",
        "fastproxy_tls_handshake_latency_seconds": "histogram",
        "fastproxy_loop_iteration_seconds": "histogram",
        "fastproxy_loop_heartbeat_age_seconds": "gauge",
        "fastproxy_refresh_successes": "counter",
        "fastproxy_refresh_failures": "counter",
        "fastproxy_certificate_expiry_timestamp_seconds": "gauge",
        "fastproxy_buffer_pool_slabs_in_use": "gauge",
        "fastproxy_buffer_pool_slabs_capacity": "gauge",
    }
    assert value(samples, "fastproxy_worker_info", worker="3") == 1
    assert value(samples, "fastproxy_connections_active") == 2
    assert value(samples, "fastproxy_connections_accepted_total", instance="p.r.c.a") == 6
    assert value(samples, "fastproxy_connections_accepted_total", instance="p.r.c.b") == 1
    assert value(samples, "fastproxy_connections_refused_total", reason="max_connections") == 5
    assert value(samples, "fastproxy_connections_refused_total", reason="out_of_fds") == 1
    failed = {labels: v for (name, labels), v in samples.items() if name.endswith("failed_total")}
    assert failed == {
        (("instance", "p.r.c.a"), ("reason", "connect")): 2,
        (("instance", "p.r.c.a"), ("reason", "tls")): 1,
    }
    assert value(samples, "fastproxy_connections_closed_total", result="ok") == 4
    assert value(samples, "fastproxy_connections_closed_total", result="error") == 1
    assert value(samples, "fastproxy_bytes_sent_total", instance="p.r.c.a") == 1000
    assert value(samples, "fastproxy_bytes_received_total", instance="p.r.c.a") == 2000
    assert value(samples, "fastproxy_bytes_received_total", instance="p.r.c.b") == 20

    dial = "fastproxy_dial_latency_seconds"
    assert value(samples, dial + "_count", instance="p.r.c.a") == 4
    assert value(samples, dial + "_sum", instance="p.r.c.a") == pytest.approx(60.043)
    assert value(samples, dial + "_bucket", instance="p.r.c.a", le="0.001") == 0
    assert value(samples, dial + "_bucket", instance="p.r.c.a", le="0.005") == 1
    assert value(samples, dial + "_bucket", instance="p.r.c.a", le="0.025") == 3
    assert value(samples, dial + "_bucket", instance="p.r.c.a", le="30.0") == 3
    assert value(samples, dial + "_bucket", instance="p.r.c.a", le="+Inf") == 4
    assert value(samples, dial + "_count", instance="p.r.c.b") == 0
    tls = "fastproxy_tls_handshake_latency_seconds"
    assert value(samples, tls + "_bucket", instance="p.r.c.a", le="0.001") == 1
    loop = "fastproxy_loop_iteration_seconds"
    assert value(samples, loop + "_count") == 2
    assert value(samples, loop + "_bucket", le="2.5e-05") == 1
    assert value(samples, loop + "_bucket", le="0.0005") == 2
    assert value(samples, "fastproxy_loop_heartbeat_age_seconds") == 0.25

    assert value(samples, "fastproxy_refresh_successes_total", instance="p.r.c.a") == 3
    assert value(samples, "fastproxy_refresh_failures_total", instance="p.r.c.a") == 2
    assert value(samples, "fastproxy_refresh_failures_total", instance="p.r.c.b") == 4
    expiry = "fastproxy_certificate_expiry_timestamp_seconds"
    assert value(samples, expiry, instance="p.r.c.a") == 1_800_000_000.0
    assert (expiry, (("instance", "p.r.c.b"),)) not in samples  # no certificate yet
    assert value(samples, "fastproxy_buffer_pool_slabs_in_use") == 7
    assert value(samples, "fastproxy_buffer_pool_slabs_capacity") == 256


def test_collector_namespace() -> None:
    samples, types = parse(render(_fake_snapshot(), namespace="myns"))
    assert value(samples, "myns_connections_active") == 2
    assert all(name.startswith("myns_") for name in types)
    samples, _ = parse(render(_fake_snapshot(), namespace=""))
    assert value(samples, "connections_active") == 2


def test_invalid_namespace_is_config_error() -> None:
    with pytest.raises(ConfigError, match="prometheus-namespace"):
        HealthState(health_check=False, prometheus=True, namespace="bad-name")


def test_metrics_endpoint_serves_the_collector(
    server: Callable[..., tuple[HealthServer, str]],
) -> None:
    srv, base = server()
    source = FakeSource()
    source.snapshot = _fake_snapshot()
    srv.attach(source, refresh=FakeRefresh({"p.r.c.a": RefreshSnapshot(1, 0, 1.5e9)}))
    r = get(base + "/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == CONTENT_TYPE_METRICS
    samples, _ = parse(r.text)
    assert value(samples, "fastproxy_connections_accepted_total", instance="p.r.c.a") == 6
    assert value(samples, "fastproxy_certificate_expiry_timestamp_seconds", instance="p.r.c.a") == (
        1.5e9
    )
    # The registry is private to this server: the default one does not know these metrics.
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("fastproxy_connections_active") is None
    assert srv.registry.get_sample_value("fastproxy_connections_active") == 2


def test_metrics_before_attach_are_zero(server: Callable[..., tuple[HealthServer, str]]) -> None:
    _, base = server()
    samples = scrape(base)
    assert value(samples, "fastproxy_connections_active") == 0
    assert value(samples, "fastproxy_worker_info", worker="0") == 1
    assert value(samples, "fastproxy_connections_refused_total", reason="max_connections") == 0
    assert value(samples, "fastproxy_loop_iteration_seconds_count") == 0
    assert not [k for k in samples if dict(k[1]).get("instance")]


# --- the refresher's counters --------------------------------------------------------------------


class _NoLoop:
    def call_soon_threadsafe(self, fn: Callable[..., object], *args: object) -> bool:
        return True


class _FlakyFetcher:
    """Fails the first call, then answers with a certificate expiring at ``expires_at``."""

    def __init__(self, expires_at: float) -> None:
        self.expires_at = expires_at
        self.calls = 0

    def fetch(
        self, uri: InstanceURI, public_key_pem: str, *, use_metadata_exchange: bool = True
    ) -> InstanceMaterial:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("the Admin API is having a bad day")
        return InstanceMaterial(
            uri=uri,
            ip_addresses={"PRIVATE": "127.0.0.2"},
            instance_uid="uid",
            chain_pems=["leaf", "ca"],
            ca_cert_pem="ca",
            expires_at=self.expires_at,
        )


def test_refresher_counts_successes_failures_and_expiry() -> None:
    expires = time.time() + 3600
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refresher = Refresher(
        _NoLoop(),
        _FlakyFetcher(expires),
        key_factory=lambda: key,
        context_factory=lambda chain, k, ca: SSL.Context(SSL.TLS_CLIENT_METHOD),
        rate=1000.0,
        burst=10,
    )
    uri = InstanceURI.parse("projects/p/locations/r/clusters/c/instances/i")
    assert refresher.metrics_snapshot() == {}
    RefreshingSource(refresher, uri, token_source=lambda: ("token", None))
    assert refresher.metrics_snapshot() == {"p.r.c.i": RefreshSnapshot(0, 0, None)}
    refresher.start()
    try:
        wait_until(lambda: refresher.metrics_snapshot()["p.r.c.i"].successes == 1, "a refresh")
    finally:
        refresher.stop()
    assert refresher.metrics_snapshot() == {"p.r.c.i": RefreshSnapshot(1, 1, expires)}
    samples, _ = parse(render(MetricsSnapshot(), refresher.metrics_snapshot()))
    assert value(samples, "fastproxy_refresh_failures_total", instance="p.r.c.i") == 1
    assert value(samples, "fastproxy_certificate_expiry_timestamp_seconds", instance="p.r.c.i") == (
        pytest.approx(expires)
    )


# --- an in-process proxy -------------------------------------------------------------------------


def test_proxy_metrics_snapshot_counts_open_and_closed_connections(
    emulator_echo: EmulatorProcess,
) -> None:
    listener = Listener.tcp("127.0.0.1", 0, echo_source(emulator_echo))
    with running_proxy([listener], worker_index=2) as proxy:
        snap = proxy.metrics_snapshot()
        assert snap.worker == 2 and snap.active == 0 and dict(snap.instances) == {}
        sock = connect(listener.port)
        echo(sock, b"x" * 5000)
        snap = proxy.metrics_snapshot()
        inst = snap.instances[DEMO_SHORT]
        # Still open: bytes come from the live read of the open connection.
        assert (inst.accepted, inst.bytes_up, inst.bytes_down) == (1, 5000, 5000)
        assert inst.dial_latency.observations == 1 and inst.tls_latency.observations == 1
        assert snap.active == 1
        sock.close()
        wait_idle(proxy)
        snap = proxy.metrics_snapshot()
        inst = snap.instances[DEMO_SHORT]
        assert (inst.bytes_up, inst.bytes_down) == (5000, 5000)  # now from the closed totals
        assert snap.closed_ok == 1 and snap.active == 0
        assert snap.loop_latency.observations > 0
        assert snap.heartbeat_age is not None


def test_proxy_metrics_count_failures_by_reason(emulator_echo: EmulatorProcess) -> None:
    data = echo_static_data(emulator_echo)
    data = {**data, DEMO_URI: {**data[DEMO_URI], "ipAddress": dead_address()}}
    listener = Listener.tcp("127.0.0.1", 0, echo_source(emulator_echo, data))
    with running_proxy([listener]) as proxy:
        with connect(listener.port) as sock:
            sock.settimeout(WAIT_S)
            assert sock.recv(10) == b""
        wait_idle(proxy)
        inst = proxy.metrics_snapshot().instances[DEMO_SHORT]
        assert dict(inst.failed) == {"connect": 1}
        assert inst.dial_latency.observations == 0  # only established sessions are timed
        assert proxy.stats()["dial_failures"] == 1


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_health_and_metrics_end_to_end(
    emulator_echo: EmulatorProcess, proxy_factory: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    static = write_static_info(emulator_echo, "echo-token", tmp_path / "static.json")
    proxy = proxy_factory(
        *static_args(static, "echo-token"),
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

    before = scrape(base)
    accepted0 = value(
        before, "fastproxy_connections_accepted_total", default=0.0, instance=DEMO_SHORT
    )
    sent0 = value(before, "fastproxy_bytes_sent_total", default=0.0, instance=DEMO_SHORT)
    received0 = value(before, "fastproxy_bytes_received_total", default=0.0, instance=DEMO_SHORT)
    dials0 = value(before, "fastproxy_dial_latency_seconds_count", default=0.0, instance=DEMO_SHORT)
    assert value(before, "fastproxy_worker_info", worker="0") == 1

    payload = b"x" * 10_000
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            assert chunk, "EOF before echo"
            got += chunk
        assert got == payload
        during = scrape(base)  # the connection is still open: live byte counts
        assert value(during, "fastproxy_connections_active") >= 1
        assert value(during, "fastproxy_bytes_sent_total", instance=DEMO_SHORT) >= sent0 + len(
            payload
        )

    def moved() -> bool:
        s = scrape(base)
        return (
            value(s, "fastproxy_connections_closed_total", result="ok") >= 1
            and value(s, "fastproxy_connections_active") == 0
        )

    wait_until(moved, "the connection to be closed in the metrics")
    after = scrape(base)
    assert (
        value(after, "fastproxy_connections_accepted_total", instance=DEMO_SHORT) >= accepted0 + 1
    )
    assert value(after, "fastproxy_bytes_sent_total", instance=DEMO_SHORT) >= sent0 + len(payload)
    assert value(after, "fastproxy_bytes_received_total", instance=DEMO_SHORT) >= received0 + len(
        payload
    )
    assert value(after, "fastproxy_dial_latency_seconds_count", instance=DEMO_SHORT) >= dials0 + 1
    assert value(after, "fastproxy_tls_handshake_latency_seconds_count", instance=DEMO_SHORT) >= 1
    assert value(after, "fastproxy_loop_iteration_seconds_count") > 0
    assert proxy.stop() == 143  # SIGTERM, as the Auth Proxy (without --exit-zero-sigterm)


@pytest.mark.e2e
def test_with_backend_check_startup_waits_for_a_successful_dial(
    emulator_echo: EmulatorProcess, proxy_factory: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    static = write_static_info(emulator_echo, "echo-token", tmp_path / "static.json")
    port = free_port()
    startup = f"http://localhost:{port}/startup"
    proxy_factory(
        *static_args(static, "echo-token"),
        "--health-check",
        "--http-port",
        str(port),
        "--with-backend-check",
    )
    deadline = time.monotonic() + 30
    while http_status(startup) != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert http_status(startup) == 200


@pytest.mark.e2e
def test_with_backend_check_startup_stays_503_while_the_instance_is_unreachable(
    emulator_echo: EmulatorProcess, proxy_factory: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    static = write_static_info(emulator_echo, "echo-token", tmp_path / "static.json")
    rewrite_address(static, DEMO_URI, dead_address())
    port = free_port()
    startup = f"http://localhost:{port}/startup"
    proxy = proxy_factory(
        *static_args(static, "echo-token"),
        "--health-check",
        "--http-port",
        str(port),
        "--with-backend-check",
        "--dial-timeout",
        "1s",
    )
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert http_status(startup) == 503
        time.sleep(0.2)
    assert "Backend check failed" in proxy.output()
    assert requests.get(f"http://localhost:{port}/liveness", timeout=2).status_code == 200
