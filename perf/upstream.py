"""The upstream every peer talks to, identical for all of them, plus the C tools.

* ``sink`` (perf/c/sink.c): plaintext epoll server on 127.0.0.1 with four listeners: echo
  protocol with / without the metadata exchange, and relay-to-PostgreSQL with / without it.
* haproxy in server mode terminates TLS 1.3 with client-certificate verification in front of
  them, on port 5433 of four loopback addresses (fastproxy always dials port 5433):

  ========== ===================== ===============================
  name       address               behind haproxy
  ========== ===================== ===============================
  echo-mdx   127.0.0.<b>:5433      sink, answers the exchange first
  echo       127.0.0.<b+1>:5433    sink
  pg-mdx     127.0.0.<b+2>:5433    sink relay to PostgreSQL, exchange first
  pg         127.0.0.<b+3>:5433    sink relay to PostgreSQL
  echo2      127.0.0.<b+4>:5433    sink, through a second haproxy process
  ========== ===================== ===============================

  ``echo2`` exists for the 19,000-connection hold of ``--workers 2``: a proxied connection costs
  the upstream haproxy two descriptors too, and one process may have 20,000, so the second half
  of those connections goes through a second haproxy process (the sink holds one descriptor per
  connection and takes all 19,000).

  ``b`` is 21 unless something already listens there. No session tickets and no session
  cache on the server: every peer pays a full handshake per connection, as fastproxy does.
* a throwaway PostgreSQL 15 (fastproxy.emulator.backend.ThrowawayPostgres) for pgbench.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from perf import procs
from perf.certs import CertFiles

HERE = Path(__file__).resolve().parent
C_DIR = HERE / "c"
UPSTREAM_PORT = 5433
BASES = (21, 61, 101, 141, 181, 221)
NAMES = ("echo-mdx", "echo", "pg-mdx", "pg", "echo2")
#: Served by the second haproxy process (see the module docstring).
SECOND_PROCESS = ("echo2",)
HAPROXY_MAXCONN = 9900  # 2 descriptors per connection under the 20,000 hard limit
UPSTREAM_THREADS = min(os.cpu_count() or 1, 4)


def build_tools(build_dir: Path) -> tuple[Path, Path]:
    """Compile sink and loadgen with gcc -O2 (only when the source is newer)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for name, extra in (("sink", []), ("loadgen", ["-pthread", "-lssl", "-lcrypto"])):
        src, exe = C_DIR / f"{name}.c", build_dir / name
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            cmd = ["gcc", "-O2", "-Wall", "-o", str(exe), str(src), *extra]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"building {name} failed: {r.stderr.strip()}")
        out.append(exe)
    return out[0], out[1]


def _bindable(ip: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def choose_addresses() -> dict[str, str]:
    """Four consecutive loopback IPs whose port 5433 is free, 127.0.0.21.. preferred."""
    for base in BASES:
        ips = [f"127.0.0.{base + i}" for i in range(len(NAMES))]
        if all(_bindable(ip, UPSTREAM_PORT) for ip in ips):
            return dict(zip(NAMES, ips, strict=True))
    raise RuntimeError("no free block of loopback addresses with port 5433 available")


@dataclass
class Upstream:
    workdir: Path
    certs: CertFiles
    addresses: dict[str, str]  # name -> IP (port 5433)
    sink_exe: Path
    sink_ports: dict[str, int] = field(default_factory=dict)
    pg_port: int = 0
    children: list[procs.Child] = field(default_factory=list)
    pg: object | None = None

    @property
    def sink_plain(self) -> tuple[str, int]:
        """The sink itself, no TLS and no exchange: the plain-TCP ceiling."""
        return "127.0.0.1", self.sink_ports["echo"]

    def start(self, with_postgres: bool) -> None:
        if with_postgres:
            from fastproxy.emulator.backend import ThrowawayPostgres

            pg = ThrowawayPostgres(max_connections=250)
            self.pg = pg
            pg.start()
            self.pg_port = pg.port
        self.sink_ports = {name: procs.free_port() for name in NAMES}
        argv = [str(self.sink_exe)]
        for name, port in self.sink_ports.items():
            spec = f"127.0.0.1:{port}"
            if name.endswith("-mdx"):
                spec += ",mdx"
            if name.startswith("pg"):
                if not with_postgres:
                    continue
                spec += f",relay=127.0.0.1:{self.pg_port}"
            argv += ["--listen", spec]
        sink = procs.start("sink", argv, self.workdir)
        self.children.append(sink)
        procs.wait_tcp(sink, "127.0.0.1", self.sink_ports["echo"])
        cfg = self.workdir / "haproxy-upstream.cfg"
        cfg.write_text(self._haproxy_config(with_postgres))
        hp = procs.start("haproxy-upstream", ["haproxy", "-db", "-f", str(cfg)], self.workdir)
        self.children.append(hp)
        procs.wait_tcp(hp, self.addresses["echo"], UPSTREAM_PORT)
        cfg2 = self.workdir / "haproxy-upstream-2.cfg"
        cfg2.write_text(self._haproxy_config(with_postgres, SECOND_PROCESS))
        hp2 = procs.start("haproxy-upstream-2", ["haproxy", "-db", "-f", str(cfg2)], self.workdir)
        self.children.append(hp2)
        procs.wait_tcp(hp2, self.addresses["echo2"], UPSTREAM_PORT)

    def _haproxy_config(self, with_postgres: bool, names: tuple[str, ...] = ()) -> str:
        """The configuration of the haproxy process serving ``names`` (default: all but the
        second process's)."""
        c = self.certs
        lines = [
            "global",
            f"    maxconn {HAPROXY_MAXCONN}",
            f"    nbthread {UPSTREAM_THREADS}",
            "    tune.ssl.cachesize 0",
            "    ssl-default-bind-options ssl-min-ver TLSv1.3 no-tls-tickets",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 10m",
            "    timeout server 10m",
            f"    maxconn {HAPROXY_MAXCONN}",
        ]
        for name in names or tuple(n for n in NAMES if n not in SECOND_PROCESS):
            if name.startswith("pg") and not with_postgres:
                continue
            lines += [
                f"frontend up_{name.replace('-', '_')}",
                f"    bind {self.addresses[name]}:{UPSTREAM_PORT} ssl crt {c.server_combined} "
                f"ca-file {c.ca} verify required",
                f"    default_backend sink_{name.replace('-', '_')}",
                f"backend sink_{name.replace('-', '_')}",
                f"    server s 127.0.0.1:{self.sink_ports[name]}",
            ]
        return "\n".join(lines) + "\n"

    def stop(self) -> None:
        for child in reversed(self.children):
            procs.stop(child)
        self.children.clear()
        pg, self.pg = self.pg, None
        if pg is not None:
            with contextlib.suppress(Exception):
                pg.stop()  # type: ignore[attr-defined]


def tool_versions() -> dict[str, str]:
    """One line per tool, for the JSON (missing tools say so)."""

    def first_line(argv: list[str]) -> str:
        if shutil.which(argv[0]) is None:
            return "not installed"
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"error: {exc}"
        text = (r.stdout + r.stderr).strip().splitlines()
        return text[0] if text else ""

    def stunnel_line() -> str:
        # stunnel prints its configuration notes first; the version line names the platform.
        exe = shutil.which("stunnel4") or shutil.which("stunnel")
        if exe is None:
            return "not installed"
        try:
            r = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"error: {exc}"
        lines = (r.stdout + r.stderr).splitlines()
        return next((ln.strip() for ln in lines if " on " in ln and "stunnel" in ln), "")

    return {
        "haproxy": first_line(["haproxy", "-v"]),
        "stunnel": stunnel_line(),
        "openssl": first_line(["openssl", "version"]),
        "gcc": first_line(["gcc", "--version"]),
        "pgbench": first_line(["pgbench", "--version"]),
    }


def machine() -> dict[str, object]:
    info: dict[str, object] = {"uname": " ".join(os.uname()), "cpus": os.cpu_count()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_kib"] = int(line.split()[1])
    with contextlib.suppress(OSError):
        info["os"] = next(
            line.split("=", 1)[1].strip('"')
            for line in Path("/etc/os-release").read_text().splitlines()
            if line.startswith("PRETTY_NAME=")
        )
    import resource

    info["nofile_limit"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
    return info
