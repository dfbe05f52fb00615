"""The health and metrics HTTP server: ``/startup``, ``/liveness``, ``/readiness``, ``/metrics``.

It runs on its own thread with its own listening socket (stdlib ``ThreadingHTTPServer``) and never
touches the loop's sockets: it only reads flags, the loop's heartbeat and counter snapshots
(``Proxy.stats()``, ``Proxy.metrics_snapshot()``, ``Refresher.metrics_snapshot()``), which is safe
from any thread (see :mod:`fastproxy.stats`).

Semantics follow the Auth Proxy: ``/startup`` answers 200 once the proxy has started,
``/readiness`` 200 when started, not shutting down and below ``--max-connections`` (if set); 503
with a short reason otherwise. ``/liveness`` answers 200 while the event loop is alive: the loop
stamps a heartbeat on every iteration (and wakes at least once a second when idle), and a
heartbeat older than ``liveness_threshold`` seconds (default 10) means the loop thread is wedged
in a handler: 503.

``/metrics`` is rendered by ``prometheus_client`` from a custom collector registered in a private
:class:`~prometheus_client.CollectorRegistry` per server. The collector reads snapshots of plain
int counters when scraped; nothing on the loop thread ever calls ``prometheus_client``. Metric
names (each prefixed with ``<namespace>_``, default ``fastproxy_``):

================================================  =========  ==================  =================
name                                              type       labels              source
================================================  =========  ==================  =================
``worker_info``                                   gauge      worker              always 1
``connections_active``                            gauge
``connections_accepted_total``                    counter    instance
``connections_refused_total``                     counter    reason              accept pauses
``connections_failed_total``                      counter    instance, reason    before splicing
``connections_closed_total``                      counter    result (ok|error)
``bytes_sent_total``                              counter    instance            client → AlloyDB
``bytes_received_total``                          counter    instance            AlloyDB → client
``dial_latency_seconds``                          histogram  instance
``tls_handshake_latency_seconds``                 histogram  instance
``loop_iteration_seconds``                        histogram                      busy time
``loop_heartbeat_age_seconds``                    gauge
``refresh_successes_total``                       counter    instance
``refresh_failures_total``                        counter    instance
``certificate_expiry_timestamp_seconds``          gauge      instance            unix seconds
``buffer_pool_slabs_in_use``                      gauge
``buffer_pool_slabs_capacity``                    gauge
================================================  =========  ==================  =================

See :mod:`fastproxy.stats` for what each reason means and when bytes are counted.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fastproxy.errors import ConfigError
from fastproxy.stats import (
    REFUSED_MAX_CONNECTIONS,
    REFUSED_OUT_OF_FDS,
    HistogramSnapshot,
    MetricsSnapshot,
    RefreshSnapshot,
)

log = logging.getLogger("fastproxy.health")

DEFAULT_NAMESPACE = "fastproxy"
#: ``generate_latest`` writes the classic text format; prometheus_client itself serves it as 0.0.4
#: to scrapers that do not ask for OpenMetrics.
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"
#: /liveness turns 503 once the loop's heartbeat is older than this (seconds).
DEFAULT_LIVENESS_THRESHOLD = 10.0

_NAMESPACE_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


class StatusSource(Protocol):
    """What the server reads from the proxy (``Proxy`` satisfies it)."""

    @property
    def max_connections(self) -> int: ...

    @property
    def is_stopping(self) -> bool: ...

    def stats(self) -> dict[str, Any]: ...

    def heartbeat_age(self) -> float | None: ...

    def metrics_snapshot(self) -> MetricsSnapshot: ...


class RefreshMetricsSource(Protocol):
    """Certificate refresh counters per instance (``Refresher`` satisfies it)."""

    def metrics_snapshot(self) -> Mapping[str, RefreshSnapshot]: ...


# --------------------------------------------------------------------------------------------------
# the collector


def _histogram(family: HistogramMetricFamily, labels: list[str], snap: HistogramSnapshot) -> None:
    cumulative = snap.cumulative()
    buckets = [(repr(b), float(c)) for b, c in zip(snap.bounds, cumulative, strict=False)]
    buckets.append(("+Inf", float(cumulative[-1])))
    family.add_metric(labels, buckets, snap.total)


class ProxyCollector(Collector):
    """A ``prometheus_client`` collector over snapshots (see the module docstring for names).

    ``snapshot`` and ``refresh`` are called on the scraping thread at every collection.
    """

    def __init__(
        self,
        snapshot: Callable[[], MetricsSnapshot],
        refresh: Callable[[], Mapping[str, RefreshSnapshot]] | None = None,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> None:
        self._snapshot = snapshot
        self._refresh = refresh
        self._prefix = f"{namespace}_" if namespace else ""

    def collect(self) -> Iterable[Metric]:
        p = self._prefix
        snap = self._snapshot()
        instances = sorted(snap.instances.items())

        worker = GaugeMetricFamily(
            p + "worker_info", "Identity of this proxy process (1).", labels=["worker"]
        )
        worker.add_metric([str(snap.worker)], 1)
        yield worker
        yield GaugeMetricFamily(
            p + "connections_active", "Client connections currently open.", value=snap.active
        )

        accepted = CounterMetricFamily(
            p + "connections_accepted", "Client connections accepted.", labels=["instance"]
        )
        sent = CounterMetricFamily(
            p + "bytes_sent",
            "Bytes from clients to the instance (closed connections plus open ones' so far).",
            labels=["instance"],
        )
        received = CounterMetricFamily(
            p + "bytes_received",
            "Bytes from the instance to clients (closed connections plus open ones' so far).",
            labels=["instance"],
        )
        failed = CounterMetricFamily(
            p + "connections_failed",
            "Client connections that ended before the session was established, by reason "
            "(connect, dns, socket, tls, exchange, timeout, no_connection_info).",
            labels=["instance", "reason"],
        )
        dial = HistogramMetricFamily(
            p + "dial_latency_seconds",
            "Time from dialling to an established session (connect, TLS, metadata exchange).",
            labels=["instance"],
        )
        tls = HistogramMetricFamily(
            p + "tls_handshake_latency_seconds",
            "Time from TCP connected to TLS handshake done.",
            labels=["instance"],
        )
        for name, inst in instances:
            accepted.add_metric([name], inst.accepted)
            sent.add_metric([name], inst.bytes_up)
            received.add_metric([name], inst.bytes_down)
            for reason, count in sorted(inst.failed.items()):
                failed.add_metric([name, reason], count)
            _histogram(dial, [name], inst.dial_latency)
            _histogram(tls, [name], inst.tls_latency)
        yield accepted

        refused = CounterMetricFamily(
            p + "connections_refused",
            "Times accepting was paused (clients wait in the backlog), by reason.",
            labels=["reason"],
        )
        for reason in (REFUSED_MAX_CONNECTIONS, REFUSED_OUT_OF_FDS):
            refused.add_metric([reason], snap.refused.get(reason, 0))
        yield refused
        yield failed

        closed = CounterMetricFamily(
            p + "connections_closed", "Client connections closed, by result.", labels=["result"]
        )
        closed.add_metric(["ok"], snap.closed_ok)
        closed.add_metric(["error"], snap.closed_error)
        yield closed
        yield sent
        yield received
        yield dial
        yield tls

        loop = HistogramMetricFamily(
            p + "loop_iteration_seconds",
            "Busy time of one event loop iteration (from select returning to the next select).",
        )
        _histogram(loop, [], snap.loop_latency)
        yield loop
        if snap.heartbeat_age is not None:
            yield GaugeMetricFamily(
                p + "loop_heartbeat_age_seconds",
                "Seconds since the event loop last returned from select.",
                value=snap.heartbeat_age,
            )

        refresh = self._refresh() if self._refresh is not None else {}
        ok = CounterMetricFamily(
            p + "refresh_successes",
            "Successful certificate refreshes.",
            labels=["instance"],
        )
        bad = CounterMetricFamily(
            p + "refresh_failures", "Failed certificate refreshes.", labels=["instance"]
        )
        expiry = GaugeMetricFamily(
            p + "certificate_expiry_timestamp_seconds",
            "Expiry of the current client certificate (unix seconds).",
            labels=["instance"],
        )
        for name, r in sorted(refresh.items()):
            ok.add_metric([name], r.successes)
            bad.add_metric([name], r.failures)
            if r.expires_at is not None:
                expiry.add_metric([name], r.expires_at)
        yield ok
        yield bad
        yield expiry

        yield GaugeMetricFamily(
            p + "buffer_pool_slabs_in_use", "Buffer pool slabs currently in use.", snap.pool_in_use
        )
        yield GaugeMetricFamily(
            p + "buffer_pool_slabs_capacity",
            "Buffer pool slabs allocated.",
            snap.pool_capacity,
        )


def check_namespace(namespace: str) -> str:
    """The namespace if it is a valid metric name prefix (or empty), else ConfigError."""
    if namespace and not _NAMESPACE_RE.fullmatch(namespace):
        raise ConfigError(
            f"invalid --prometheus-namespace {namespace!r}: use letters, digits, '_' and ':' "
            "(not starting with a digit)"
        )
    return namespace


def build_registry(
    snapshot: Callable[[], MetricsSnapshot],
    refresh: Callable[[], Mapping[str, RefreshSnapshot]] | None = None,
    namespace: str = DEFAULT_NAMESPACE,
) -> CollectorRegistry:
    """A private registry holding one :class:`ProxyCollector` (no process/GC default metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(snapshot, refresh, check_namespace(namespace)))
    return registry


def render(
    snapshot: MetricsSnapshot,
    refresh: Mapping[str, RefreshSnapshot] | None = None,
    namespace: str = DEFAULT_NAMESPACE,
) -> str:
    """The text exposition for one snapshot (tests, one-off dumps)."""
    registry = build_registry(lambda: snapshot, (lambda: refresh or {}), namespace)
    return generate_latest(registry).decode()


# --------------------------------------------------------------------------------------------------
# the server


class HealthState:
    """Flags, the status sources and the metrics registry, read by the handler threads."""

    def __init__(
        self,
        *,
        health_check: bool,
        prometheus: bool,
        namespace: str = DEFAULT_NAMESPACE,
        liveness_threshold: float = DEFAULT_LIVENESS_THRESHOLD,
    ) -> None:
        self.health_check = health_check
        self.prometheus = prometheus
        self.namespace = check_namespace(namespace)
        self.liveness_threshold = liveness_threshold
        self.started = False
        self.stopping = False
        self.source: StatusSource | None = None
        self.refresh: RefreshMetricsSource | None = None
        self.registry = build_registry(self._metrics_snapshot, self._refresh_snapshot, namespace)

    def _metrics_snapshot(self) -> MetricsSnapshot:
        source = self.source
        return source.metrics_snapshot() if source is not None else MetricsSnapshot()

    def _refresh_snapshot(self) -> Mapping[str, RefreshSnapshot]:
        refresh = self.refresh
        return refresh.metrics_snapshot() if refresh is not None else {}

    def liveness(self) -> tuple[int, str]:
        source = self.source
        age = source.heartbeat_age() if source is not None else None
        if age is not None and age > self.liveness_threshold:
            return 503, f"event loop unresponsive for {age:.1f} s"
        return 200, "ok"

    def readiness(self) -> tuple[int, str]:
        if not self.started:
            return 503, "not started"
        source = self.source
        if self.stopping or (source is not None and source.is_stopping):
            return 503, "shutting down"
        if source is not None and source.max_connections > 0:
            active = int(source.stats().get("active", 0))
            if active >= source.max_connections:
                return 503, f"max connections reached ({active}/{source.max_connections})"
        return 200, "ok"

    def respond(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of ``path``."""
        path = path.split("?", 1)[0]
        text = "text/plain; charset=utf-8"
        if self.health_check:
            if path == "/startup":
                return (200, text, b"ok") if self.started else (503, text, b"not started")
            if path == "/liveness":
                status, reason = self.liveness()
                return status, text, reason.encode()
            if path == "/readiness":
                status, reason = self.readiness()
                return status, text, reason.encode()
        if self.prometheus and path == "/metrics":
            return 200, CONTENT_TYPE_METRICS, generate_latest(self.registry)
        return 404, text, b"not found"


def make_handler(state: HealthState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fastproxy-health"

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def _answer(self, *, body: bool) -> None:
            try:
                status, ctype, data = state.respond(self.path)
            except Exception:  # a bug must not kill the handler thread silently
                log.exception("health handler error for %s", self.path)
                status, ctype, data = 500, "text/plain; charset=utf-8", b"internal error"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("health: " + format, *args)

    return Handler


def _server_class(host: str) -> type[ThreadingHTTPServer]:
    try:
        family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except OSError as exc:
        raise ConfigError(f"invalid --http-address {host!r}: {exc}") from exc

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    return Server


class HealthServer:
    """The HTTP server on its own thread; the constructor binds (ConfigError if it cannot)."""

    def __init__(self, host: str, port: int, state: HealthState) -> None:
        self.host = host
        self.state = state
        cls = _server_class(host)
        try:
            self._server = cls((host, port), make_handler(state))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} for health and metrics: {exc.strerror or exc}"
            ) from exc
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def registry(self) -> CollectorRegistry:
        """The private registry ``/metrics`` renders."""
        return self.state.registry

    def start(self) -> None:
        serve: Callable[[], None] = self._server.serve_forever
        self._thread = threading.Thread(target=serve, name="fastproxy-health", daemon=True)
        self._thread.start()
        log.info("Health and metrics server listening on %s:%d", self.host, self.port)

    def attach(self, source: StatusSource, refresh: RefreshMetricsSource | None = None) -> None:
        """Read status and loop metrics from ``source`` (the ``Proxy``) and, if given, certificate
        refresh metrics from ``refresh`` (the ``Refresher``)."""
        self.state.source = source
        if refresh is not None:
            self.state.refresh = refresh

    def attach_refresher(self, refresh: RefreshMetricsSource) -> None:
        """Certificate refresh metrics (may be called before :meth:`attach`)."""
        self.state.refresh = refresh

    def mark_started(self) -> None:
        self.state.started = True

    def mark_stopping(self) -> None:
        self.state.stopping = True

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
