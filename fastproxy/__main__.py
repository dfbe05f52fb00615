"""``fastproxy`` / ``python -m fastproxy``: the command line (a thin layer over the library).

This is the data-plane subset of the Auth Proxy's command line: static connection info, listeners
and exchange options. The Admin API path and the rest of the flags come with the connector.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastproxy import __version__
from fastproxy.admin import DEFAULT_ENDPOINT, AdminClient
from fastproxy.conntest import ConnectionTestFailed, dial_once
from fastproxy.credentials import CredentialOptions, build_credentials, notices, token_for
from fastproxy.duration import parse_duration
from fastproxy.errors import ConfigError
from fastproxy.health import DEFAULT_NAMESPACE, HealthServer, HealthState
from fastproxy.instance_uri import InstanceURI, split_query
from fastproxy.listener import Listener
from fastproxy.loop import Loop, raise_nofile_limit
from fastproxy.proxy import Proxy
from fastproxy.refresh import LazySource, Refresher, RefreshingSource, TokenSource
from fastproxy.source import (
    USER_AGENT,
    ConnectionInfoSource,
    IPType,
    StaticSource,
    load_static_file,
    static_dial_info,
)

log = logging.getLogger("fastproxy")

DEFAULT_PORT = 5432
CONNECTION_TEST_TIMEOUT_S = 60.0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 1 (the Auth Proxy's convention)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fastproxy",
        description="A fast AlloyDB Auth Proxy: listens locally and forwards every connection "
        "over TLS 1.3 with a client certificate to the AlloyDB instance.",
    )
    p.add_argument("instances", nargs="*", metavar="INSTANCE_URI")
    p.add_argument("--address", "-a", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", "-p", type=int, help="first port to listen on (default 5432)")
    p.add_argument("--unix-socket", "-u", type=Path, help="directory for unix sockets")
    p.add_argument("--static-connection-info", type=Path, help="JSON file (development only)")
    p.add_argument(
        "--alloydbadmin-api-endpoint",
        default=DEFAULT_ENDPOINT,
        help="Admin API endpoint (default %(default)s)",
    )
    p.add_argument("--credentials-file", "-c", help="service account or user credentials file")
    p.add_argument("--json-credentials", "-j", help="credentials JSON given inline")
    p.add_argument("--gcloud-auth", "-g", action="store_true", help="use gcloud's credentials")
    p.add_argument(
        "--impersonate-service-account", help="target[,delegate...] service account chain"
    )
    p.add_argument("--quota-project", help="project billed for Admin API calls")
    p.add_argument("--user-agent", help="extra User-Agent parts for Admin API calls")
    p.add_argument("--lazy-refresh", action="store_true", help="refresh certificates on demand")
    p.add_argument(
        "--run-connection-test",
        action="store_true",
        help="dial every instance at start-up and exit 1 if one fails",
    )
    p.add_argument("--token", "-t", help="OAuth2 token for the metadata exchange")
    p.add_argument("--login-token", help="separate OAuth2 token for the exchange (IAM authn)")
    p.add_argument("--auto-iam-authn", "-i", action="store_true", help="IAM database login")
    p.add_argument("--public-ip", action="store_true", help="dial the public IP")
    p.add_argument("--psc", action="store_true", help="dial the PSC DNS name")
    p.add_argument("--max-connections", type=int, default=0, help="0 = unlimited")
    p.add_argument(
        "--dial-timeout",
        default="30s",
        help="deadline to connect, handshake and exchange with the instance (default 30s)",
    )
    p.add_argument(
        "--health-check",
        action="store_true",
        help="serve /startup, /liveness and /readiness on the HTTP address and port",
    )
    p.add_argument(
        "--http-address",
        default="localhost",
        help="address for the health and metrics server (default %(default)s)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=9090,
        help="port for the health and metrics server (default %(default)s; 0 = any free port)",
    )
    p.add_argument("--prometheus", action="store_true", help="serve Prometheus /metrics")
    p.add_argument(
        "--prometheus-namespace",
        default="",
        help=f"prefix for metric names (default {DEFAULT_NAMESPACE})",
    )
    p.add_argument("--debug-logs", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--version", "-v", action="version", version=f"fastproxy {__version__}")
    return p


@dataclass(frozen=True)
class InstanceArg:
    uri: InstanceURI
    address: str | None
    port: int | None


def _parse_bool(key: str, value: str) -> bool:
    v = value.lower()
    if v in ("", "t", "true"):
        return True
    if v in ("f", "false"):
        return False
    raise ConfigError(f"invalid value for ?{key}=: {value!r} (want true or false)")


def parse_instance_arg(arg: str) -> tuple[InstanceArg, dict[str, str]]:
    raw, query = split_query(arg)
    uri = InstanceURI.parse(raw)
    port = None
    if "port" in query:
        try:
            port = int(query["port"])
        except ValueError as exc:
            raise ConfigError(f"invalid ?port= for {uri.short}: {query['port']!r}") from exc
    return InstanceArg(uri, query.get("address"), port), query


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except ConfigError as exc:
        print(f"fastproxy: error: {exc}", file=sys.stderr)
        return 1


def _flag(query: dict[str, str], key: str, default: bool) -> bool:
    return _parse_bool(key, query[key]) if key in query else default


def _ip_type(query: dict[str, str], args: argparse.Namespace) -> str:
    public = _flag(query, "public-ip", args.public_ip)
    psc = _flag(query, "psc", args.psc)
    # The Auth Proxy applies public-ip then psc, so PSC wins when both are set (protocol §6).
    return IPType.PSC if psc else IPType.PUBLIC if public else IPType.PRIVATE


def _token_source(credentials: Any) -> TokenSource:
    """The exchange token, fetched (and refreshed) on the refresher thread, never the loop."""

    def source() -> tuple[str, float | None]:
        token = token_for(credentials)
        expiry = getattr(credentials, "expiry", None)
        # google-auth keeps expiry as a naive UTC datetime.
        when = expiry.replace(tzinfo=datetime.UTC).timestamp() if expiry else None
        return token, when

    return source


def _build_sources(
    args: argparse.Namespace,
    parsed: list[tuple[InstanceArg, dict[str, str]]],
    loop: Loop,
) -> tuple[list[ConnectionInfoSource], Refresher | None]:
    if args.static_connection_info is not None and not args.lazy_refresh:
        data = load_static_file(args.static_connection_info)
        token = args.login_token or args.token or ""
        static: list[ConnectionInfoSource] = []
        for inst, query in parsed:
            ip_type = _ip_type(query, args)
            info = static_dial_info(
                data,
                inst.uri,
                public_ip=ip_type == IPType.PUBLIC,
                psc=ip_type == IPType.PSC,
                auto_iam_authn=_flag(query, "auto-iam-authn", args.auto_iam_authn),
                exchange_token=token,
                user_agent=USER_AGENT,
            )
            source = StaticSource(info)
            if (err := source.error()) is not None:
                # As the Auth Proxy: stay up; every connection will fail with this reason.
                log.warning("[%s] %s", inst.uri.short, err)
            static.append(source)
        return static, None

    any_iam = args.auto_iam_authn or any(
        _flag(q, "auto-iam-authn", args.auto_iam_authn) for _, q in parsed
    )
    opts = CredentialOptions(
        token=args.token,
        login_token=args.login_token,
        credentials_file=args.credentials_file,
        json_credentials=args.json_credentials,
        impersonate_service_account=args.impersonate_service_account,
        gcloud_auth=args.gcloud_auth,
        auto_iam_authn=any_iam,
        quota_project=args.quota_project,
    )
    creds = build_credentials(opts)
    for line in notices(opts):
        log.info("%s", line)
    client = AdminClient(
        creds.api,
        endpoint=args.alloydbadmin_api_endpoint,
        user_agent=args.user_agent or "",
        quota_project=args.quota_project,
    )
    refresher = Refresher(loop, client)
    sources: list[ConnectionInfoSource] = []
    cls = LazySource if args.lazy_refresh else RefreshingSource
    for inst, query in parsed:
        sources.append(
            cls(
                refresher,
                inst.uri,
                _ip_type(query, args),
                auto_iam=_flag(query, "auto-iam-authn", args.auto_iam_authn),
                user_agent=USER_AGENT,
                token_source=_token_source(creds.login),
            )
        )
    return sources, refresher


def _connection_test(sources: list[ConnectionInfoSource], refresher: Refresher | None) -> None:
    """Dial every instance once; ConfigError (exit 1) naming the first failures."""
    if refresher is not None:
        for uri, err in refresher.wait_first(CONNECTION_TEST_TIMEOUT_S).items():
            if err is not None:
                raise ConfigError(f"connection test failed for {uri.short}: {err}")
    failures: list[str] = []
    for source in sources:
        info = source.current()
        if info is None:
            failures.append(f"[{source.name}] no connection info: {source.error()}")
            continue
        try:
            dial_once(info)
        except ConnectionTestFailed as exc:
            failures.append(str(exc))
    if failures:
        raise ConfigError("; ".join(failures))
    log.info("Connection test passed")


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug_logs else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%Y/%m/%d %H:%M:%S")
    if not args.instances:
        raise ConfigError("missing instance URI: at least one is required")
    if args.unix_socket and args.port is not None:
        raise ConfigError("--unix-socket and --port cannot be used together")
    # Instance arguments are checked before any file is read: a typo in a URI is the user's first
    # problem, whatever else is missing.
    parsed = [parse_instance_arg(arg) for arg in args.instances]
    dial_timeout = parse_duration(args.dial_timeout)
    if dial_timeout <= 0:
        raise ConfigError("--dial-timeout must be positive")
    raise_nofile_limit()

    health: HealthServer | None = None
    if args.health_check or args.prometheus:
        # Before the listeners, so /startup answers 503 until the proxy is ready.
        state = HealthState(
            health_check=args.health_check,
            prometheus=args.prometheus,
            namespace=args.prometheus_namespace or DEFAULT_NAMESPACE,
        )
        health = HealthServer(args.http_address, args.http_port, state)
        health.start()
    try:
        return _serve(args, parsed, dial_timeout, health)
    finally:
        if health is not None:
            health.close()


def _serve(
    args: argparse.Namespace,
    parsed: list[tuple[InstanceArg, dict[str, str]]],
    dial_timeout: float,
    health: HealthServer | None,
) -> int:
    loop = Loop()
    sources, refresher = _build_sources(args, parsed, loop)
    if refresher is not None:
        refresher.start()
    try:
        if args.run_connection_test:
            _connection_test(sources, refresher)
        listeners: list[Listener] = []
        next_port = args.port if args.port is not None else DEFAULT_PORT
        try:
            for (inst, _query), source in zip(parsed, sources, strict=True):
                if args.unix_socket is not None:
                    path = args.unix_socket / inst.uri.socket_dir_name / ".s.PGSQL.5432"
                    listener = Listener.unix(path, source)
                else:
                    port = inst.port if inst.port is not None else next_port
                    if inst.port is None and next_port != 0:  # --port 0: any free port for each
                        next_port += 1
                    listener = Listener.tcp(inst.address or args.address, port, source)
                listeners.append(listener)
                log.info("Listening on %s for %s", listener.description, inst.uri.uri)
        except BaseException:
            for listener in listeners:
                listener.close()
            raise

        proxy = Proxy(
            listeners, max_connections=args.max_connections, dial_timeout=dial_timeout, loop=loop
        )

        if health is not None:
            health.attach(proxy)

        def on_signal(signum: int, frame: object) -> None:
            log.info("Received %s, shutting down", signal.Signals(signum).name)
            if health is not None:
                health.mark_stopping()
            proxy.stop()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        log.info("The proxy has started successfully and is ready for new connections!")
        if health is not None:
            health.mark_started()
        proxy.run()
    finally:
        if refresher is not None:
            refresher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
