"""The health and metrics HTTP server: ``/startup``, ``/liveness``, ``/readiness``, ``/metrics``.

It runs on its own thread with its own listening socket (stdlib ``ThreadingHTTPServer``) and never
touches the loop's sockets: it only reads flags and a counters snapshot (``Proxy.stats()``), which
is safe from any thread (see :mod:`fastproxy.stats`).

Semantics follow the Auth Proxy: ``/startup`` answers 200 once the proxy has started, ``/liveness``
200 while the process runs, ``/readiness`` 200 when started, not shutting down and below
``--max-connections`` (if set); 503 with a short reason otherwise.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from fastproxy.errors import ConfigError

log = logging.getLogger("fastproxy.health")

DEFAULT_NAMESPACE = "fastproxy"
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"


class StatusSource(Protocol):
    """What the server reads from the proxy (``Proxy`` satisfies it)."""

    @property
    def max_connections(self) -> int: ...

    @property
    def is_stopping(self) -> bool: ...

    def stats(self) -> dict[str, Any]: ...


# (suffix, type, help, stats key, labels)
_METRICS: tuple[tuple[str, str, str, str, str], ...] = (
    (
        "connections_accepted_total",
        "counter",
        "Client connections accepted.",
        "accepted",
        "",
    ),
    (
        "connections_closed_total",
        "counter",
        "Client connections closed, by result.",
        "closed_ok",
        'result="ok"',
    ),
    ("connections_closed_total", "", "", "closed_error", 'result="error"'),
    (
        "bytes_sent_total",
        "counter",
        "Bytes sent from clients to instances (counted when a connection closes).",
        "bytes_up",
        "",
    ),
    (
        "bytes_received_total",
        "counter",
        "Bytes received from instances for clients (counted when a connection closes).",
        "bytes_down",
        "",
    ),
    (
        "dial_failures_total",
        "counter",
        "Upstream connect, TLS or exchange failures before a session was established.",
        "dial_failures",
        "",
    ),
    ("connections_active", "gauge", "Client connections currently open.", "active", ""),
    (
        "buffer_pool_slabs_in_use",
        "gauge",
        "Buffer pool slabs currently in use.",
        "pool_in_use",
        "",
    ),
)


def render_metrics(stats: dict[str, Any], namespace: str = DEFAULT_NAMESPACE) -> str:
    """Prometheus text exposition format 0.0.4 for a ``Proxy.stats()`` snapshot."""
    prefix = f"{namespace}_" if namespace else ""
    out: list[str] = []
    for suffix, kind, help_text, key, labels in _METRICS:
        name = prefix + suffix
        if kind:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
        label_part = f"{{{labels}}}" if labels else ""
        out.append(f"{name}{label_part} {int(stats.get(key, 0))}")
    return "\n".join(out) + "\n"


class HealthState:
    """Flags and the status source, read by the handler threads."""

    def __init__(
        self, *, health_check: bool, prometheus: bool, namespace: str = DEFAULT_NAMESPACE
    ) -> None:
        self.health_check = health_check
        self.prometheus = prometheus
        self.namespace = namespace
        self.started = False
        self.stopping = False
        self.source: StatusSource | None = None

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

    def respond(self, path: str) -> tuple[int, str, str]:
        """(status, content type, body) for a GET of ``path``."""
        path = path.split("?", 1)[0]
        text = "text/plain; charset=utf-8"
        if self.health_check:
            if path == "/startup":
                return (200, text, "ok") if self.started else (503, text, "not started")
            if path == "/liveness":
                return 200, text, "ok"
            if path == "/readiness":
                status, reason = self.readiness()
                return status, text, reason
        if self.prometheus and path == "/metrics":
            stats = self.source.stats() if self.source is not None else {}
            return 200, CONTENT_TYPE_METRICS, render_metrics(stats, self.namespace)
        return 404, text, "not found"


def make_handler(state: HealthState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fastproxy-health"

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def _answer(self, *, body: bool) -> None:
            try:
                status, ctype, text = state.respond(self.path)
            except Exception as exc:  # a bug must not kill the handler thread silently
                log.debug("health handler error: %s", exc)
                status, ctype, text = 500, "text/plain; charset=utf-8", "internal error"
            data = text.encode()
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
    """The HTTP server on its own thread; ``start`` binds (ConfigError if it cannot)."""

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

    def start(self) -> None:
        serve: Callable[[], None] = self._server.serve_forever
        self._thread = threading.Thread(target=serve, name="fastproxy-health", daemon=True)
        self._thread.start()
        log.info("Health and metrics server listening on %s:%d", self.host, self.port)

    def attach(self, source: StatusSource) -> None:
        self.state.source = source

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
