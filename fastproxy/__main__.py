"""``fastproxy`` / ``python -m fastproxy``: the Auth Proxy's command line over the library.

Flags keep the Auth Proxy's spellings (the README's table lists each with its status here) and
may also come from the environment or a config file (:mod:`fastproxy.config`). The main thread
only starts things and orchestrates shutdown; the loop runs on its own thread, the health and
admin servers on theirs, and signal handlers merely record what arrived.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from fastproxy import __version__
from fastproxy.admin import DEFAULT_ENDPOINT, AdminClient, validate_endpoint
from fastproxy.config import parse_layered
from fastproxy.conntest import ConnectionTestFailed, dial_once
from fastproxy.credentials import CredentialOptions, build_credentials, notices, token_for
from fastproxy.credentials import validate as validate_credentials
from fastproxy.duration import parse_duration
from fastproxy.errors import ConfigError
from fastproxy.health import DEFAULT_NAMESPACE, HealthServer, HealthState
from fastproxy.instance_uri import InstanceURI, split_query
from fastproxy.listener import Listener
from fastproxy.logs import setup_logging
from fastproxy.loop import Loop, raise_nofile_limit
from fastproxy.proxy import Proxy
from fastproxy.refresh import LazySource, Refresher, RefreshingSource, TokenSource
from fastproxy.sdnotify import notify
from fastproxy.source import (
    USER_AGENT,
    ConnectionInfoSource,
    IPType,
    StaticSource,
    load_static_file,
    static_dial_info,
)
from fastproxy.workers import Workers, reserve_port

log = logging.getLogger("fastproxy")

DEFAULT_PORT = 5432
CONNECTION_TEST_TIMEOUT_S = 60.0
BACKEND_RETRY_S = 5.0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 1 (the Auth Proxy's convention)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


TELEMETRY_FLAGS = (
    "telemetry_project",
    "telemetry_prefix",
    "telemetry_sample_rate",
    "disable_traces",
    "disable_metrics",
    "disable_built_in_telemetry",
)


def build_parser() -> argparse.ArgumentParser:
    """Every Auth Proxy flag under its own spelling, plus fastproxy's marked extensions."""
    p = _Parser(
        prog="fastproxy",
        allow_abbrev=False,  # as pflag: "--tok" is an unknown flag, not --token
        description="A fast AlloyDB Auth Proxy: listens locally and forwards every connection "
        "over TLS 1.3 with a client certificate to the AlloyDB instance. "
        "Subcommands: 'fastproxy wait', 'fastproxy shutdown', 'fastproxy demo'.",
    )
    p.add_argument("instances", nargs="*", metavar="INSTANCE_URI")
    g = p.add_argument_group("listeners")
    g.add_argument("--address", "-a", default="127.0.0.1", help="IP address to listen on")
    g.add_argument(
        "--port", "-p", type=int, default=DEFAULT_PORT, help="first port to listen on (5432)"
    )
    g.add_argument("--unix-socket", "-u", help="directory for unix sockets")
    g.add_argument("--max-connections", type=int, default=0, help="0 = unlimited")
    g.add_argument(
        "--workers",
        type=int,
        default=1,
        help="(fastproxy) processes sharing the ports through SO_REUSEPORT (default 1)",
    )
    g = p.add_argument_group("instances")
    g.add_argument("--auto-iam-authn", "-i", action="store_true", help="IAM database login")
    g.add_argument("--public-ip", action="store_true", help="dial the public IP")
    g.add_argument("--psc", action="store_true", help="dial the PSC DNS name")
    g.add_argument("--static-connection-info", help="JSON file (development only)")
    g.add_argument(
        "--skip-metadata-exchange",
        action="store_true",
        help="(fastproxy, benchmarks) with --static-connection-info: TLS only, no metadata "
        "exchange, for upstreams that do not speak it",
    )
    g.add_argument("--lazy-refresh", action="store_true", help="refresh certificates on demand")
    g.add_argument(
        "--run-connection-test",
        action="store_true",
        help="dial every instance at start-up and exit 1 if one fails",
    )
    g.add_argument(
        "--dial-timeout",
        default="30s",
        help="(fastproxy) deadline to connect and handshake with the instance (default 30s)",
    )
    g = p.add_argument_group("credentials")
    g.add_argument(
        "--alloydbadmin-api-endpoint",
        default=DEFAULT_ENDPOINT,
        help="Admin API endpoint (default %(default)s)",
    )
    g.add_argument("--credentials-file", "-c", help="service account or user credentials file")
    g.add_argument("--json-credentials", "-j", help="credentials JSON given inline")
    g.add_argument("--gcloud-auth", "-g", action="store_true", help="use gcloud's credentials")
    g.add_argument("--token", "-t", help="OAuth2 token for Admin API calls")
    g.add_argument("--login-token", help="separate OAuth2 token for IAM database login")
    g.add_argument(
        "--impersonate-service-account", help="target[,delegate...] service account chain"
    )
    g.add_argument("--quota-project", help="(fastproxy) project billed for Admin API calls")
    g.add_argument("--user-agent", help="extra User-Agent parts for Admin API calls")
    g.add_argument("--config-file", help="TOML, YAML or JSON file with flag names as keys")
    g = p.add_argument_group("logging")
    g.add_argument(
        "--structured-logs", "-l", action="store_true", help="JSON lines (Cloud Logging shape)"
    )
    g.add_argument("--debug-logs", action="store_true", help="add refresh and dial detail")
    g.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    g = p.add_argument_group("operations")
    g.add_argument(
        "--health-check",
        action="store_true",
        help="serve /startup, /liveness and /readiness on the HTTP address and port",
    )
    g.add_argument(
        "--with-backend-check",
        action="store_true",
        help="/startup waits until a dial to every instance succeeded",
    )
    g.add_argument(
        "--http-address",
        default="localhost",
        help="address for the health and metrics server (default %(default)s)",
    )
    g.add_argument(
        "--http-port",
        type=int,
        default=9090,
        help="port for the health and metrics server (default %(default)s; 0 = any free port)",
    )
    g.add_argument("--prometheus", action="store_true", help="serve Prometheus /metrics")
    g.add_argument(
        "--prometheus-namespace",
        default="",
        help=f"prefix for metric names (default {DEFAULT_NAMESPACE})",
    )
    g.add_argument(
        "--quitquitquit",
        action="store_true",
        help="POST /quitquitquit on the admin server (127.0.0.1) shuts the proxy down",
    )
    g.add_argument(
        "--debug",
        action="store_true",
        help="profiling and debug endpoints under /debug/ on the admin server",
    )
    g.add_argument(
        "--admin-port", type=int, default=9091, help="admin server port on 127.0.0.1 (9091)"
    )
    g.add_argument(
        "--min-sigterm-delay",
        default="0s",
        help="on SIGTERM/SIGINT keep accepting this long before shutting down (default 0s)",
    )
    g.add_argument(
        "--max-sigterm-delay",
        default="0s",
        help="then wait up to this long for open connections to close (default 0s)",
    )
    g.add_argument(
        "--exit-zero-sigterm",
        "--exit-zero-on-sigterm",
        action="store_true",
        help="exit 0 instead of 143 after SIGTERM",
    )
    g = p.add_argument_group("not supported here")
    g.add_argument("--fuse", help="FUSE mounts (not supported by fastproxy: an error)")
    g.add_argument("--fuse-tmp-dir", help="FUSE temporary directory (accepted, no effect)")
    g.add_argument("--telemetry-project", help="accepted, no effect (no Cloud Monitoring export)")
    g.add_argument("--telemetry-prefix", help="accepted, no effect")
    g.add_argument("--telemetry-sample-rate", type=int, help="accepted, no effect")
    g.add_argument("--disable-traces", action="store_true", help="accepted, no effect")
    g.add_argument("--disable-metrics", action="store_true", help="accepted, no effect")
    g.add_argument("--disable-built-in-telemetry", action="store_true", help="accepted, no effect")
    p.add_argument("--version", "-v", action="version", version=f"fastproxy {__version__}")
    return p


@dataclass(frozen=True)
class InstanceArg:
    uri: InstanceURI
    address: str | None
    port: int | None
    unix_socket: str | None = None  # ?unix-socket=DIR
    unix_socket_path: str | None = None  # ?unix-socket-path=PATH


_QUERY_KEYS = (
    "address",
    "port",
    "unix-socket",
    "unix-socket-path",
    "auto-iam-authn",
    "public-ip",
    "psc",
)
_QUERY_CONFLICTS = (
    ("address", "unix-socket"),
    ("port", "unix-socket"),
    ("address", "unix-socket-path"),
    ("port", "unix-socket-path"),
    ("unix-socket-path", "unix-socket"),
)


def _parse_bool(key: str, value: str) -> bool:
    v = value.lower()
    if v in ("", "t", "true"):
        return True
    if v in ("f", "false"):
        return False
    raise ConfigError(f"invalid value for ?{key}=: {value!r} (want true or false)")


def _check_ip(value: str, what: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError as exc:
        raise ConfigError(f"{what} is not a valid IP address: {value!r}") from exc
    return value


def parse_instance_arg(arg: str) -> tuple[InstanceArg, dict[str, str]]:
    """``URI?key=value&…`` with the Auth Proxy's per-instance options and their conflicts."""
    raw, query = split_query(arg)
    uri = InstanceURI.parse(raw)
    for key in query:
        if key not in _QUERY_KEYS:
            raise ConfigError(
                f"unknown option ?{key}= for {uri.short} (known: {', '.join(_QUERY_KEYS)})"
            )
    for a, b in _QUERY_CONFLICTS:
        if a in query and b in query:
            raise ConfigError(f"cannot specify both {a} and {b} query params for {uri.short}")
    for key in ("auto-iam-authn", "public-ip", "psc"):
        if key in query:
            _parse_bool(key, query[key])
    port = None
    if "port" in query:
        try:
            port = int(query["port"])
            if not 0 <= port <= 65535:
                raise ValueError(port)
        except ValueError as exc:
            raise ConfigError(f"invalid ?port= for {uri.short}: {query['port']!r}") from exc
    address = query.get("address")
    if address is not None:
        _check_ip(address, f"?address= for {uri.short}")
    for key in ("unix-socket", "unix-socket-path"):
        if key in query and not query[key]:
            raise ConfigError(f"?{key}= for {uri.short} needs a path")
    return (
        InstanceArg(
            uri,
            address,
            port,
            unix_socket=query.get("unix-socket"),
            unix_socket_path=query.get("unix-socket-path"),
        ),
        query,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in ("wait", "shutdown", "demo"):
            return _subcommand(args[0], args[1:])
        return _main(args, os.environ)
    except ConfigError as exc:
        print(f"fastproxy: error: {exc}", file=sys.stderr)
        return 1


def _subcommand(name: str, argv: list[str]) -> int:
    if name == "wait":
        from fastproxy.control import wait_main

        return wait_main(argv)
    if name == "shutdown":
        from fastproxy.control import shutdown_main

        return shutdown_main(argv)
    from fastproxy.demo import main as demo_main

    code: int = demo_main(argv)
    return code


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
        data = load_static_file(Path(args.static_connection_info))
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
                metadata_exchange=not args.skip_metadata_exchange,
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


def _main(argv: list[str], environ: Mapping[str, str]) -> int:
    args, explicit = parse_layered(build_parser(), argv, environ)
    setup_logging(structured=args.structured_logs, debug=args.debug_logs, quiet=args.quiet)
    if args.fuse:
        raise ConfigError("--fuse is not supported by fastproxy: list the instance URIs instead")
    if not args.instances:
        raise ConfigError(
            "missing instance URI: at least one is required (e.g. "
            "projects/$PROJECT/locations/$LOCATION/clusters/$CLUSTER/instances/$INSTANCE)"
        )
    if args.unix_socket and "address" in explicit:
        raise ConfigError("cannot specify --unix-socket and --address together")
    if args.unix_socket and "port" in explicit:
        raise ConfigError("cannot specify --unix-socket and --port together")
    _check_ip(args.address, "--address")
    # Instance arguments are checked before any file is read: a typo in a URI is the user's first
    # problem, whatever else is missing.
    parsed = [parse_instance_arg(arg) for arg in args.instances]
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be a port number (0-65535), not {args.port}")
    for spec in _listen_plan(args, parsed):
        if spec.path is None and spec.port > 65535:
            raise ConfigError(
                f"no port left for {spec.uri}: consecutive ports from --port {args.port} "
                "run past 65535 (give it a ?port= or a lower --port)"
            )
    # The Auth Proxy's mutual exclusions of the credential flags, before anything starts (also
    # with --static-connection-info, which uses none of them but the tokens).
    validate_credentials(
        CredentialOptions(
            token=args.token,
            credentials_file=args.credentials_file,
            json_credentials=args.json_credentials,
            gcloud_auth=args.gcloud_auth,
            impersonate_service_account=args.impersonate_service_account,
        )
    )
    if "alloydbadmin_api_endpoint" in explicit:
        args.alloydbadmin_api_endpoint = validate_endpoint(args.alloydbadmin_api_endpoint)
    timing = _Timing(
        dial=parse_duration(args.dial_timeout),
        min_sigterm=parse_duration(args.min_sigterm_delay),
        max_sigterm=parse_duration(args.max_sigterm_delay),
    )
    if timing.dial <= 0:
        raise ConfigError("--dial-timeout must be positive")
    for flag, value in (
        ("--min-sigterm-delay", timing.min_sigterm),
        ("--max-sigterm-delay", timing.max_sigterm),
    ):
        if value < 0:
            raise ConfigError(f"{flag} must not be negative")
    if args.max_connections < 0:
        raise ConfigError("--max-connections must not be negative")
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    for flag, port in (("--http-port", args.http_port), ("--admin-port", args.admin_port)):
        if not 0 <= port <= 65535:
            raise ConfigError(f"{flag} must be a port number (0-65535), not {port}")
    if args.skip_metadata_exchange and not args.static_connection_info:
        raise ConfigError("--skip-metadata-exchange needs --static-connection-info")
    _notices(args, explicit, parsed)
    raise_nofile_limit()
    return _serve(args, explicit, parsed, timing)


@dataclass(frozen=True)
class _Timing:
    dial: float
    min_sigterm: float
    max_sigterm: float


def _notices(
    args: argparse.Namespace, explicit: set[str], parsed: list[tuple[InstanceArg, dict[str, str]]]
) -> None:
    """The Auth Proxy's one-line notices for settings that do nothing in this combination."""
    if any(getattr(args, name) for name in TELEMETRY_FLAGS):
        log.info(
            "Ignoring the telemetry flags: fastproxy has no Google Cloud Monitoring or Trace "
            "export (use --prometheus for metrics)"
        )
    if args.fuse_tmp_dir:
        log.info("Ignoring --fuse-tmp-dir because --fuse is not supported")
    if "http_port" in explicit and not (args.prometheus or args.health_check):
        log.info("Ignoring --http-port because --prometheus or --health-check was not set")
    # "Ignoring --login-token ..." comes from credentials.notices where the login token can be
    # ignored (the Admin API path); --static-connection-info uses it whatever --auto-iam-authn.
    if "alloydbadmin_api_endpoint" in explicit:
        log.info("Using API Endpoint %s", args.alloydbadmin_api_endpoint)
    addresses = [args.address] if not args.unix_socket else []
    addresses += [inst.address for inst, _ in parsed if inst.address]
    for address in dict.fromkeys(addresses):
        if not ipaddress.ip_address(address).is_loopback:
            log.warning(
                "Listening on %s, which is not a loopback address: anyone who can reach it "
                "connects with this proxy's credentials",
                address,
            )


class _ShutdownRequest:
    """What ends the proxy: a signal or /quitquitquit, recorded by whichever comes first.

    Signal handlers run on the main thread and only record; the main thread does the draining.
    A second SIGINT during the drain cuts it short (``immediate``).
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.cut_short = threading.Event()
        self.signum: int | None = None
        self.quit = False

    def on_signal(self, signum: int, frame: object) -> None:
        if self.event.is_set():
            if signum == signal.SIGINT:
                self.cut_short.set()
            return
        self.signum = signum
        self.event.set()

    def on_quitquitquit(self) -> None:
        if not self.event.is_set():
            self.quit = True
            self.event.set()

    def describe(self) -> str:
        if self.quit:
            return "/quitquitquit request"
        return signal.Signals(self.signum).name if self.signum is not None else "shutdown"

    def exit_code(self, exit_zero_sigterm: bool) -> int:
        if self.quit:
            return 0
        if self.signum == signal.SIGINT:
            return 130
        if self.signum == signal.SIGTERM:
            return 0 if exit_zero_sigterm else 143
        return 0


@dataclass
class ListenSpec:
    """Where one instance listens: a TCP address and port, or a unix socket path."""

    uri: str
    host: str = ""
    port: int = 0
    path: Path | None = None


def _listen_plan(
    args: argparse.Namespace, parsed: list[tuple[InstanceArg, dict[str, str]]]
) -> list[ListenSpec]:
    """Place every instance as the Auth Proxy does: TCP unless a unix socket is asked for and the
    instance has no address or port of its own; consecutive ports from --port otherwise."""
    plan: list[ListenSpec] = []
    next_port = args.port
    for inst, _query in parsed:
        wants_unix = bool(args.unix_socket or inst.unix_socket or inst.unix_socket_path)
        if wants_unix and inst.address is None and inst.port is None:
            if inst.unix_socket_path:
                base = Path(inst.unix_socket_path)
                if base.name == ".s.PGSQL.5432":
                    base = base.parent
            else:
                directory = str(args.unix_socket or inst.unix_socket)
                base = Path(directory) / inst.uri.socket_dir_name
            plan.append(ListenSpec(inst.uri.uri, path=base / ".s.PGSQL.5432"))
            continue
        port = inst.port if inst.port is not None else next_port
        if inst.port is None and next_port != 0:  # --port 0: any free port for each
            next_port += 1
        plan.append(ListenSpec(inst.uri.uri, host=inst.address or args.address, port=port))
    return plan


@dataclass
class _SharedSockets:
    """What worker 0 binds before forking: port reservations and the unix sockets."""

    reserved: list[socket.socket]
    unix: dict[int, socket.socket]

    def close_reservations(self) -> None:
        for sock in self.reserved:
            sock.close()
        self.reserved.clear()


def _prepare_for_workers(plan: list[ListenSpec], names: list[str]) -> _SharedSockets:
    shared = _SharedSockets([], {})
    try:
        for i, spec in enumerate(plan):
            if spec.path is not None:
                shared.unix[i] = Listener.bind_unix(spec.path, names[i])
            elif spec.port == 0:
                sock = reserve_port(spec.host)
                shared.reserved.append(sock)
                spec.port = int(sock.getsockname()[1])
    except OSError as exc:
        raise ConfigError(f"cannot reserve a port for the workers: {exc.strerror or exc}") from exc
    return shared


def _open_listeners(
    plan: list[ListenSpec],
    sources: list[ConnectionInfoSource],
    *,
    shared: _SharedSockets | None = None,
    owner: bool = True,
) -> list[Listener]:
    listeners: list[Listener] = []
    try:
        for i, (spec, source) in enumerate(zip(plan, sources, strict=True)):
            if spec.path is not None:
                sock = shared.unix.get(i) if shared is not None else None
                listener = Listener.unix(spec.path, source, sock=sock, owner=owner)
            else:
                listener = Listener.tcp(spec.host, spec.port, source, reuse_port=shared is not None)
            listeners.append(listener)
            log.info("Listening on %s for %s", listener.description, spec.uri)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _serve(
    args: argparse.Namespace,
    explicit: set[str],
    parsed: list[tuple[InstanceArg, dict[str, str]]],
    timing: _Timing,
) -> int:
    plan = _listen_plan(args, parsed)
    shared: _SharedSockets | None = None
    workers: Workers | None = None
    index = 0
    if args.workers > 1:
        # Before any thread exists: forking a threaded process is not safe.
        shared = _prepare_for_workers(plan, [inst.uri.short for inst, _ in parsed])
        index, workers = Workers.fork(args.workers)
        setup_logging(
            structured=args.structured_logs, debug=args.debug_logs, quiet=args.quiet, worker=index
        )
        if index > 0:
            _run_child_worker(args, parsed, plan, shared, timing, index)
    return _serve_worker(args, parsed, plan, shared, timing, index, workers)


def _run_child_worker(
    args: argparse.Namespace,
    parsed: list[tuple[InstanceArg, dict[str, str]]],
    plan: list[ListenSpec],
    shared: _SharedSockets | None,
    timing: _Timing,
    index: int,
) -> NoReturn:
    """A forked worker never returns into the caller's stack: it serves, then exits."""
    code = 1
    try:
        code = _serve_worker(args, parsed, plan, shared, timing, index, None)
    except ConfigError as exc:
        log.error("%s", exc)
    except BaseException:
        log.exception("worker %d failed", index)
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve_worker(
    args: argparse.Namespace,
    parsed: list[tuple[InstanceArg, dict[str, str]]],
    plan: list[ListenSpec],
    shared: _SharedSockets | None,
    timing: _Timing,
    index: int,
    workers: Workers | None,
) -> int:
    shutdown = _ShutdownRequest()
    signal.signal(signal.SIGINT, shutdown.on_signal)
    signal.signal(signal.SIGTERM, shutdown.on_signal)
    signal.signal(signal.SIGHUP, _on_sighup)
    health: HealthServer | None = None
    admin: Any = None  # fastproxy.adminserver.AdminServer, imported only when asked for
    refresher: Refresher | None = None
    first = index == 0  # worker 0 runs the HTTP servers and supervises the others
    try:
        if first and (args.health_check or args.prometheus):
            # Before the listeners, so /startup answers 503 until the proxy is ready.
            state = HealthState(
                health_check=args.health_check,
                prometheus=args.prometheus,
                namespace=args.prometheus_namespace or DEFAULT_NAMESPACE,
            )
            health = HealthServer(args.http_address, args.http_port, state)
            health.start()
        if first and (args.quitquitquit or args.debug):
            from fastproxy.adminserver import AdminServer

            admin = AdminServer(
                args.admin_port,
                quitquitquit=args.quitquitquit,
                debug=args.debug,
                on_quit=shutdown.on_quitquitquit,
            )
            admin.start()
            if args.quitquitquit:
                log.info("Enabling quitquitquit endpoint at localhost:%d", admin.port)
            if args.debug:
                log.info("Enabling debug endpoints at localhost:%d/debug/", admin.port)
        loop = Loop()
        sources, refresher = _build_sources(args, parsed, loop)
        if refresher is not None:
            refresher.start()
        if args.run_connection_test and first:
            _connection_test(sources, refresher)
        listeners = _open_listeners(plan, sources, shared=shared, owner=first)
        if shared is not None:
            shared.close_reservations()
        proxy = Proxy(
            listeners,
            max_connections=args.max_connections,
            dial_timeout=timing.dial,
            loop=loop,
            worker_index=index,
        )
        if health is not None:
            health.attach(proxy, refresh=refresher)
        if admin is not None:
            admin.attach(proxy)
        _tune_gc()
        loop_thread = proxy.start()
        # /startup first, then the ready line: whoever waits for the line may probe at once.
        if health is not None:
            if args.with_backend_check:
                threading.Thread(
                    target=_backend_check,
                    args=(sources, refresher, health, shutdown),
                    name="fastproxy-backend-check",
                    daemon=True,
                ).start()
            else:
                health.mark_started()
        if first:
            log.info("The proxy has started successfully and is ready for new connections!")
            notify("READY=1")
        code = _run_until_shutdown(proxy, loop_thread, shutdown, health, timing, args, workers)
        if args.workers > 1:
            log.info("Worker %d served %d connections", index, proxy.stats().get("accepted", 0))
        return code
    except BaseException:
        if workers is not None:
            workers.signal(signal.SIGTERM)
            workers.wait(10)
        raise
    finally:
        if refresher is not None:
            refresher.stop()
        if admin is not None:
            admin.close()
        if health is not None:
            health.close()


GC_GEN0_THRESHOLD = 50_000


def _tune_gc() -> None:
    """Make the cyclic garbage collector rare and cheap for a long-running proxy.

    The data path allocates short-lived, acyclic objects (bytes, memoryviews) that reference
    counting frees at once, yet every 700 allocations CPython ran a collection: the ping-pong
    profile showed ``gc_collect_main`` at 20% of the loop thread's time. Everything alive at
    start-up (modules, contexts, listeners) is frozen out of the collector's view, and the
    first generation is collected every 50,000 allocations instead; cycles (rare here: a
    connection's handlers are bound methods of it) are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)


def _on_sighup(signum: int, frame: object) -> None:
    """A terminal hang-up or a stray ``kill -HUP`` must not drop every connection."""
    log.info("Received SIGHUP: ignored (fastproxy does not reload; restart it to apply changes)")


def _backend_check(
    sources: list[ConnectionInfoSource],
    refresher: Refresher | None,
    health: HealthServer,
    shutdown: _ShutdownRequest,
) -> None:
    """--with-backend-check: /startup turns 200 only once every instance answered a dial."""
    while not shutdown.event.is_set():
        try:
            _connection_test(sources, refresher)
        except ConfigError as exc:
            log.warning("Backend check failed (retrying in %.0fs): %s", BACKEND_RETRY_S, exc)
            shutdown.event.wait(BACKEND_RETRY_S)
            continue
        health.mark_started()
        return


def _run_until_shutdown(
    proxy: Proxy,
    loop_thread: threading.Thread,
    shutdown: _ShutdownRequest,
    health: HealthServer | None,
    timing: _Timing,
    args: argparse.Namespace,
    workers: Workers | None = None,
) -> int:
    """Serve until a signal or /quitquitquit, then drain as the Auth Proxy does:
    keep accepting for --min-sigterm-delay, readiness 503, close the listeners, wait up to
    --max-sigterm-delay for open connections, close the rest. Worker 0 passes the signal on to
    the other workers (which drain the same way) and waits for them."""
    failed = False
    while not shutdown.event.wait(0.5):
        if not loop_thread.is_alive():
            log.error("The event loop stopped unexpectedly; exiting")
            failed = True
            break
        if workers is not None:
            gone = workers.reap()
            for worker_index, code in gone:
                log.error("Worker %d exited unexpectedly (exit code %d)", worker_index, code)
            if gone:
                failed = True
                break
    if failed:
        if workers is not None:
            workers.signal(signal.SIGTERM)
        shutdown.on_signal(signal.SIGTERM, None)
    else:
        log.info("Received %s, shutting down", shutdown.describe())
        if workers is not None:
            workers.signal(signal.SIGINT if shutdown.signum == signal.SIGINT else signal.SIGTERM)
    notify("STOPPING=1")
    if timing.min_sigterm > 0 and not shutdown.cut_short.is_set():
        log.info(
            "Waiting %s before closing listeners (--min-sigterm-delay)", args.min_sigterm_delay
        )
        shutdown.cut_short.wait(timing.min_sigterm)
    if health is not None:
        health.mark_stopping()
    proxy.stop_accepting()
    remained = 0
    if timing.max_sigterm > 0 and not shutdown.cut_short.is_set():
        deadline = time.monotonic() + timing.max_sigterm
        active = proxy.active_connections
        if active:
            log.info(
                "Waiting up to %s for %d open connections (--max-sigterm-delay)",
                args.max_sigterm_delay,
                active,
            )
        while proxy.active_connections > 0 and time.monotonic() < deadline:
            if shutdown.cut_short.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
                break
        remained = proxy.active_connections
        if remained and not shutdown.cut_short.is_set():
            log.error(
                "%d active connections still open after waiting %s; closing them",
                remained,
                args.max_sigterm_delay,
            )
    proxy.stop()
    proxy.join(10)
    if workers is not None:
        if shutdown.cut_short.is_set():
            workers.signal(signal.SIGINT)
        workers.wait(timing.min_sigterm + timing.max_sigterm + 10)
        if any(code == 1 for code in workers.exit_codes.values()):
            remained = remained or 1  # a worker had connections left after the delay
    if failed:
        return 1
    if shutdown.cut_short.is_set():
        return 130
    if remained:
        return 1
    return shutdown.exit_code(args.exit_zero_sigterm)


if __name__ == "__main__":
    sys.exit(main())
