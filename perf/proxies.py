"""The rows of the comparison: how to start each proxy against an upstream.

A *target* is something the load generator (or pgbench) connects to:

* ``plain-tcp``: the sink itself (or PostgreSQL itself for pgbench), no TLS: the ceiling.
* ``direct-tls``: the load generator speaks TLS 1.3 with the client certificate straight to the
  upstream (no proxy hop): shows the upstream is not the bottleneck.
* proxies, each a local process listening on 127.0.0.1 and dialling the upstream with the
  client certificate: fastproxy (several configurations), stunnel4, haproxy, and the two
  Python peers in perf/peers/.

Peers that cannot speak the metadata exchange are compared with fastproxy running
``--skip-metadata-exchange`` against the no-exchange upstream (like for like); the row
``fastproxy+mdx`` is fastproxy with the exchange against the upstream that answers it.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from perf import procs
from perf.certs import URI_PREFIX, CertFiles
from perf.upstream import UPSTREAM_PORT, Upstream

REPO = Path(__file__).resolve().parent.parent
FASTPROXY = REPO / ".venv" / "bin" / "fastproxy"
PYTHON = Path(sys.executable)


@dataclass
class Target:
    """A row: ``kind`` is "plain", "direct" or "proxy"."""

    name: str
    kind: str
    description: str
    mdx: bool = False  # talks to the upstream that answers the metadata exchange
    fastproxy_args: list[str] = field(default_factory=list)  # fastproxy rows only
    launcher: str = ""  # "fastproxy", "stunnel", "haproxy", "threaded", "asyncio"
    note: str = ""

    @property
    def is_fastproxy(self) -> bool:
        return self.launcher == "fastproxy"


def fastproxy_help() -> str:
    try:
        r = subprocess.run(
            [str(FASTPROXY), "--help"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def default_targets(extra_fastproxy: list[tuple[str, list[str]]]) -> tuple[list[Target], list[str]]:
    """Every row that can run here, and notes about the ones that cannot."""
    notes: list[str] = []
    helptext = fastproxy_help()
    skip_flag = "--skip-metadata-exchange" in helptext
    rows = [
        Target("plain-tcp", "plain", "load generator -> sink, no TLS, no proxy (ceiling)"),
        Target("direct-tls", "direct", "load generator speaks TLS 1.3 to the upstream, no proxy"),
    ]
    if skip_flag:
        rows.append(
            Target(
                "fastproxy",
                "proxy",
                "fastproxy --skip-metadata-exchange (like for like with the peers)",
                fastproxy_args=["--skip-metadata-exchange"],
                launcher="fastproxy",
            )
        )
    else:
        notes.append(
            "fastproxy has no --skip-metadata-exchange flag: the like-for-like row is missing; "
            "only fastproxy+mdx (with the exchange) is measured"
        )
    rows.append(
        Target(
            "fastproxy+mdx",
            "proxy",
            "fastproxy with the metadata exchange (upstream answers it)",
            mdx=True,
            launcher="fastproxy",
        )
    )
    if "--workers" in helptext and skip_flag:
        rows.append(
            Target(
                "fastproxy-w2",
                "proxy",
                "fastproxy --workers 2 --skip-metadata-exchange",
                fastproxy_args=["--skip-metadata-exchange", "--workers", "2"],
                launcher="fastproxy",
            )
        )
    for name, args in extra_fastproxy:
        rows.append(
            Target(
                name,
                "proxy",
                "fastproxy " + shlex.join(args),
                mdx="--skip-metadata-exchange" not in args,
                fastproxy_args=args,
                launcher="fastproxy",
            )
        )
    if shutil.which("stunnel4") or shutil.which("stunnel"):
        rows.append(Target("stunnel", "proxy", "stunnel4 client mode", launcher="stunnel"))
    else:
        notes.append("stunnel4 not installed: row skipped")
    if shutil.which("haproxy"):
        rows.append(
            Target("haproxy", "proxy", "haproxy client mode (ssl server)", launcher="haproxy")
        )
    else:
        notes.append("haproxy not installed: row skipped")
    rows.append(
        Target(
            "py-threaded",
            "proxy",
            "Python, thread per connection, stdlib ssl",
            launcher="threaded",
        )
    )
    flavour = "uvloop" if uvloop_available() else "asyncio"
    rows.append(
        Target(
            "py-asyncio",
            "proxy",
            f"Python, asyncio streams + stdlib ssl on {flavour}",
            launcher="asyncio",
            note=flavour,
        )
    )
    return rows, notes


def _stunnel_config(t: Target, port: int, ip: str, certs: CertFiles, workdir: Path) -> Path:
    cfg = workdir / f"stunnel-{t.name}-{port}.conf"
    cfg.write_text(
        "\n".join(
            [
                "foreground = yes",
                "pid =",
                "debug = warning",
                "syslog = no",
                "[proxy]",
                "client = yes",
                f"accept = 127.0.0.1:{port}",
                f"connect = {ip}:{UPSTREAM_PORT}",
                f"cert = {certs.client_cert}",
                f"key = {certs.client_key}",
                f"CAfile = {certs.ca}",
                "verifyChain = yes",
                f"checkIP = {ip}",
                "sslVersionMin = TLSv1.3",
                "socket = l:TCP_NODELAY=1",
                "socket = r:TCP_NODELAY=1",
                "",
            ]
        )
    )
    return cfg


def _haproxy_config(t: Target, port: int, ip: str, certs: CertFiles, workdir: Path) -> Path:
    cfg = workdir / f"haproxy-{t.name}-{port}.cfg"
    cfg.write_text(
        "\n".join(
            [
                "global",
                "    maxconn 9900",
                "defaults",
                "    mode tcp",
                "    timeout connect 5s",
                "    timeout client 10m",
                "    timeout server 10m",
                "    maxconn 9900",
                "frontend local",
                f"    bind 127.0.0.1:{port}",
                "    default_backend upstream",
                "backend upstream",
                f"    server s {ip}:{UPSTREAM_PORT} ssl crt {certs.client_combined} "
                f"ca-file {certs.ca} verify required ssl-min-ver TLSv1.3 no-ssl-reuse",
                "",
            ]
        )
    )
    return cfg


def start_proxy(
    t: Target, up: Upstream, service: str, workdir: Path, also: str = ""
) -> tuple[procs.Child, list[int]]:
    """Start the proxy of row ``t`` in front of upstream ``service`` ("echo" or "pg"); returns
    it and its local ports. ``also`` (fastproxy rows only): a second instance, e.g. "echo2"
    (behind its own upstream process), on a second port: one proxy serving two instances, for
    holds beyond one upstream process's descriptors."""
    upstream_name = f"{service}-mdx" if t.mdx else service
    ip = up.addresses[upstream_name]
    port = procs.free_port()
    ports = [port]
    extra_uris: list[str] = []
    if also:
        if t.launcher != "fastproxy":
            raise ValueError("only fastproxy rows serve two instances")
        ports.append(procs.free_port())
        extra_uris.append(f"{URI_PREFIX}{also}?port={ports[1]}")
    certs = up.certs
    name = f"{t.name}-{service}-{port}"
    common = [
        "--ca",
        str(certs.ca),
        "--cert",
        str(certs.client_cert),
        "--key",
        str(certs.client_key),
    ]
    starters: dict[str, Callable[[], list[str]]] = {
        "fastproxy": lambda: [
            str(FASTPROXY),
            "--static-connection-info",
            str(certs.static_info),
            "--token",
            "x",
            "--port",
            str(port),
            *t.fastproxy_args,
            URI_PREFIX + upstream_name,
            *extra_uris,
        ],
        "stunnel": lambda: [
            shutil.which("stunnel4") or "stunnel",
            str(_stunnel_config(t, port, ip, certs, workdir)),
        ],
        "haproxy": lambda: [
            "haproxy",
            "-db",
            "-f",
            str(_haproxy_config(t, port, ip, certs, workdir)),
        ],
        "threaded": lambda: [
            str(PYTHON),
            "-m",
            "perf.peers.threaded",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"{ip}:{UPSTREAM_PORT}",
            *common,
        ],
        "asyncio": lambda: [
            str(PYTHON),
            "-m",
            "perf.peers.asyncio_proxy",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"{ip}:{UPSTREAM_PORT}",
            *common,
        ],
    }
    argv = starters[t.launcher]()
    child = procs.start(name, argv, workdir, cwd=REPO)
    for p in ports:
        procs.wait_tcp(child, "127.0.0.1", p, timeout=30)
    return child, ports
