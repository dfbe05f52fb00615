"""``python -m fastproxy.emulator``: a local AlloyDB (Admin API, CA, server side) for tests.

Start order: the backend (PostgreSQL takes the longest), then the Admin API on its own threads,
then the server side on every instance address, then the ready file, written atomically so that
whoever polls for it never reads half a file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import json
import logging
import os
import resource
import secrets
import signal
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastproxy.emulator.adminapi import make_admin_server
from fastproxy.emulator.backend import (
    DEFAULT_SUPERUSER_PASSWORD,
    BackendError,
    ThrowawayPostgres,
)
from fastproxy.emulator.dataplane import ServerSide
from fastproxy.emulator.pki import PKI
from fastproxy.emulator.state import (
    DEFAULT_INSTANCE_URI,
    Backend,
    EmulatorState,
    Instance,
    InstanceName,
    InstanceURIError,
    iam_db_user,
)

log = logging.getLogger("fastproxy.emulator")

SERVER_PORT = 5433  # AlloyDB's server-side proxy port; clients cannot change it
DEFAULT_PRINCIPAL = "demo-user@example.com"
# Instance addresses are probed from here on; 127.0.0.1 is left to ordinary services.
FIRST_INSTANCE_ADDRESS = ipaddress.IPv4Address("127.0.0.2")
LAST_INSTANCE_ADDRESS = ipaddress.IPv4Address("127.0.255.254")
_BIND_ATTEMPTS = 20


class UsageError(Exception):
    """A command-line mistake: printed as one line, exit code 1."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fastproxy.emulator",
        description="A local AlloyDB emulator: Admin API, cluster CAs and the server-side "
        "TLS proxy on port 5433 of a loopback address per instance.",
    )
    p.add_argument(
        "--instance",
        action="append",
        metavar="URI",
        help=f"instance URI (repeatable; default: {DEFAULT_INSTANCE_URI})",
    )
    p.add_argument(
        "--backend",
        default="postgres",
        help="'postgres' (start a throwaway PostgreSQL, default), HOST:PORT (an existing "
        "PostgreSQL) or 'echo' (echo every byte back)",
    )
    p.add_argument("--admin-address", default="127.0.0.1", help="Admin API address")
    p.add_argument("--admin-port", type=int, default=0, help="Admin API port (0 = any free)")
    p.add_argument(
        "--token",
        action="append",
        metavar="TOKEN[=PRINCIPAL]",
        help="accepted bearer token, mapped to an IAM principal (default principal "
        f"{DEFAULT_PRINCIPAL}); repeatable. Without any, one is generated and printed",
    )
    p.add_argument(
        "--forbid",
        action="append",
        metavar="PRINCIPAL=CLUSTER",
        default=[],
        help="answer 403 to PRINCIPAL for the cluster projects/P/locations/R/clusters/C",
    )
    p.add_argument(
        "--cert-lifetime",
        type=float,
        metavar="SECONDS",
        help="lifetime of issued client certificates (default: honour certDuration, "
        "clamped to 1h-24h)",
    )
    p.add_argument(
        "--postgres-password",
        default=DEFAULT_SUPERUSER_PASSWORD,
        help="password of the throwaway PostgreSQL's superuser 'postgres' (default: %(default)s)",
    )
    p.add_argument("--ready-file", type=Path, help="write a JSON description here once ready")
    p.add_argument("--debug", action="store_true", help="debug logging")
    return p.parse_args(argv)


def parse_tokens(values: Sequence[str] | None) -> dict[str, str]:
    if not values:
        return {secrets.token_urlsafe(24): DEFAULT_PRINCIPAL}
    tokens: dict[str, str] = {}
    for v in values:
        token, sep, principal = v.partition("=")
        if not token or (sep and not principal):
            raise UsageError(f"--token: expected TOKEN or TOKEN=PRINCIPAL, got {v!r}")
        tokens[token] = principal if sep else DEFAULT_PRINCIPAL
    return tokens


def parse_backend(value: str) -> Backend:
    if value in ("postgres", "echo"):
        return Backend(kind=value)
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--backend: expected postgres, echo or HOST:PORT, got {value!r}")
    return Backend(kind="external", host=host.strip("[]"), port=int(port))


def address_free(addr: str, port: int = SERVER_PORT) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, port))
        except OSError:
            return False
    return True


def allocate_addresses(count: int, start: ipaddress.IPv4Address) -> list[str]:
    """``count`` loopback addresses whose port 5433 is free, probing upwards from ``start``.

    Probing (rather than a fixed table) is what lets two emulators share one machine.
    """
    found: list[str] = []
    addr = start
    while len(found) < count:
        if addr > LAST_INSTANCE_ADDRESS:
            raise UsageError("no free loopback address with port 5433 left in 127.0.0.0/16")
        if address_free(str(addr)):
            found.append(str(addr))
        addr += 1
    return found


def build_instances(uris: Sequence[str], start: ipaddress.IPv4Address) -> dict[str, Instance]:
    names = [InstanceName.parse(u) for u in uris]
    addrs = allocate_addresses(2 * len(names), start)
    instances: dict[str, Instance] = {}
    for n, name in enumerate(names):
        uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{name.uri}#{os.getpid()}#{addrs[2 * n]}"))
        tag = hashlib.sha256(name.uri.encode()).hexdigest()[:8]
        instances[name.uri] = Instance(
            name=name,
            instance_uid=uid,
            ip_address=addrs[2 * n],
            public_ip_address=addrs[2 * n + 1],
            psc_dns_name=f"{uid[:8]}.{tag}.{name.region}.alloydb-psc.goog.",
        )
    return instances


def write_ready_file(path: Path, info: dict[str, Any]) -> None:
    path = path.resolve()
    fd, tmp = tempfile.mkstemp(prefix=".ready-", dir=str(path.parent))
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Emulator:
    """Owns every part; ``run`` blocks until SIGINT/SIGTERM."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tokens = parse_tokens(args.token)
        self.backend = parse_backend(args.backend)
        uris = args.instance or [DEFAULT_INSTANCE_URI]
        self.uris = list(dict.fromkeys(InstanceName.parse(u).uri for u in uris))
        self.forbidden: set[tuple[str, str]] = set()
        for f in args.forbid:
            principal, sep, cluster = f.partition("=")
            if not sep or not principal or not cluster:
                raise UsageError(f"--forbid: expected PRINCIPAL=CLUSTER, got {f!r}")
            self.forbidden.add((principal, cluster))
        if args.cert_lifetime is not None and args.cert_lifetime < 5:
            raise UsageError("--cert-lifetime must be at least 5 seconds")
        self.postgres: ThrowawayPostgres | None = None

    def start_backend(self) -> None:
        if self.backend.kind != "postgres":
            return
        roles = [iam_db_user(p) for p in self.tokens.values()]
        self.postgres = ThrowawayPostgres(
            superuser_password=self.args.postgres_password, iam_roles=roles
        )
        self.postgres.start()
        self.backend.host = self.postgres.host
        self.backend.port = self.postgres.port
        self.backend.iam_password = self.postgres.iam_password

    def stop_backend(self) -> None:
        if self.postgres is not None:
            self.postgres.stop()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        start = FIRST_INSTANCE_ADDRESS
        for attempt in range(_BIND_ATTEMPTS):
            instances = build_instances(self.uris, start)
            state = EmulatorState(
                instances=instances,
                tokens=dict(self.tokens),
                backend=self.backend,
                cert_lifetime_s=self.args.cert_lifetime,
                forbidden=set(self.forbidden),
            )
            pki = PKI()
            server = ServerSide(state, pki, port=SERVER_PORT)
            try:
                listeners = await server.start()
                break
            except OSError as exc:
                await server.close()
                if exc.errno != errno.EADDRINUSE or attempt == _BIND_ATTEMPTS - 1:
                    raise
                # Another emulator took an address between our probe and our bind.
                highest = max(
                    ipaddress.IPv4Address(a) for i in instances.values() for a in i.addresses()
                )
                start = highest + 1

        admin = make_admin_server(state, pki, self.args.admin_address, self.args.admin_port)
        admin_thread = threading.Thread(
            target=admin.serve_forever, name="emulator-admin-api", daemon=True
        )
        admin_thread.start()
        try:
            host, port = admin.server_address[:2]
            endpoint = f"http://{_url_host(str(host))}:{port}"
            info = self.ready_info(endpoint, state)
            self.announce(endpoint, listeners, info)
            if self.args.ready_file:
                write_ready_file(self.args.ready_file, info)
            await stop.wait()
            log.info("emulator: shutting down")
        finally:
            admin.shutdown()
            admin.server_close()
            await server.close()
            if self.args.ready_file:
                with contextlib.suppress(OSError):
                    self.args.ready_file.unlink()

    def ready_info(self, endpoint: str, state: EmulatorState) -> dict[str, Any]:
        backend: dict[str, Any] = {
            "kind": self.backend.kind,
            "host": self.backend.host,
            "port": self.backend.port,
        }
        if self.backend.kind == "postgres":
            # When "postgres" is itself an IAM principal its password is the emulator's secret.
            iam = any(iam_db_user(p) == "postgres" for p in self.tokens.values())
            backend.update(user="postgres", password=None if iam else self.args.postgres_password)
        return {
            "pid": os.getpid(),
            "admin_endpoint": endpoint,
            "tokens": [
                {"token": t, "principal": p, "db_user": iam_db_user(p)}
                for t, p in self.tokens.items()
            ],
            "instances": [
                {
                    "uri": i.name.uri,
                    "ip_address": i.ip_address,
                    "public_ip_address": i.public_ip_address,
                    "psc_dns_name": i.psc_dns_name,
                    "instance_uid": i.instance_uid,
                    "port": SERVER_PORT,
                }
                for i in state.instances.values()
            ],
            "backend": backend,
            "host": self.backend.host,
            "port": self.backend.port,
        }

    def announce(
        self, endpoint: str, listeners: Sequence[tuple[str, int]], info: dict[str, Any]
    ) -> None:
        out = sys.stdout
        print(f"emulator: Admin API listening on {endpoint}", file=out)
        for addr, port in listeners:
            print(f"emulator: server side listening on {addr}:{port}", file=out)
        b = info["backend"]
        if b["kind"] == "echo":
            print("emulator: backend echo (every byte is sent back)", file=out)
        else:
            print(f"emulator: backend PostgreSQL at {b['host']}:{b['port']}", file=out)
        for t in info["tokens"]:
            print(f"emulator: token {t['token']} -> {t['principal']}", file=out)
        token = info["tokens"][0]["token"]
        uris = " ".join(i["uri"] for i in info["instances"])
        print(
            "emulator: ready; run the proxy with:\n"
            f"  fastproxy --alloydbadmin-api-endpoint {endpoint} --token {token} {uris}",
            file=out,
            flush=True,
        )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    raise_nofile_limit()
    try:
        emulator = Emulator(args)
    except (UsageError, InstanceURIError) as exc:
        print(f"emulator: error: {exc}", file=sys.stderr)
        return 1
    # SIGTERM before the asyncio loop owns signals must still clean up the backend.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        emulator.start_backend()
        asyncio.run(emulator.serve())
    except (BackendError, UsageError) as exc:
        print(f"emulator: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"emulator: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop_backend()
    return 0


if __name__ == "__main__":
    sys.exit(main())
