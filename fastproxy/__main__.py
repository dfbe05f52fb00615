"""``fastproxy`` / ``python -m fastproxy``: the command line (a thin layer over the library).

This is the data-plane subset of the Auth Proxy's command line: static connection info, listeners
and exchange options. The Admin API path and the rest of the flags come with the connector.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastproxy import __version__
from fastproxy.duration import parse_duration
from fastproxy.errors import ConfigError
from fastproxy.instance_uri import InstanceURI, split_query
from fastproxy.listener import Listener
from fastproxy.loop import raise_nofile_limit
from fastproxy.proxy import Proxy
from fastproxy.source import StaticSource, load_static_file, static_dial_info

log = logging.getLogger("fastproxy")

DEFAULT_PORT = 5432


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
    if args.static_connection_info is None:
        raise ConfigError(
            "--static-connection-info is required in this version (the Admin API connector "
            "is not built yet)"
        )
    dial_timeout = parse_duration(args.dial_timeout)
    if dial_timeout <= 0:
        raise ConfigError("--dial-timeout must be positive")
    data = load_static_file(args.static_connection_info)
    token = args.login_token or args.token or ""
    raise_nofile_limit()

    listeners: list[Listener] = []
    next_port = args.port if args.port is not None else DEFAULT_PORT
    try:
        for inst, query in parsed:
            info = static_dial_info(
                data,
                inst.uri,
                public_ip=_parse_bool("public-ip", query["public-ip"])
                if "public-ip" in query
                else args.public_ip,
                psc=_parse_bool("psc", query["psc"]) if "psc" in query else args.psc,
                auto_iam_authn=_parse_bool("auto-iam-authn", query["auto-iam-authn"])
                if "auto-iam-authn" in query
                else args.auto_iam_authn,
                exchange_token=token,
            )
            source = StaticSource(info)
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

    proxy = Proxy(listeners, max_connections=args.max_connections, dial_timeout=dial_timeout)

    def on_signal(signum: int, frame: object) -> None:
        log.info("Received %s, shutting down", signal.Signals(signum).name)
        proxy.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log.info("The proxy has started successfully and is ready for new connections!")
    proxy.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
