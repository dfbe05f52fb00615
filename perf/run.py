"""The load test: set up the upstream, run every section against every row, collect numbers.

Sections (``--only`` takes a comma-separated subset):

* ``bulk``: upload and download MB/s (10^6 B) on 1 and 16 connections.
* ``pingpong``: 100-byte echo round trips, closed loop, on 1 and 64 connections.
* ``connrate``: new connections per second (connect, one 100-byte echo, close).
* ``hold``: idle connections held open; proxy RSS per connection.
* ``pgbench``: select-only and TPC-B through each proxy to a real PostgreSQL.

Every external command has a timeout, every load loop a count and a time bound.
"""

from __future__ import annotations

import json
import os
import re
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from perf import procs
from perf.certs import generate
from perf.proxies import Target, start_proxy
from perf.upstream import UPSTREAM_PORT, Upstream, build_tools, choose_addresses

SECTIONS = ("bulk", "pingpong", "connrate", "hold", "pgbench")
PG_PASSWORD = "postgres"  # ThrowawayPostgres's default superuser password


@dataclass(frozen=True)
class Plan:
    quick: bool
    bulk_bytes: int
    bulk_conns: tuple[int, ...] = (1, 16)
    bulk_time_cap: float = 120.0
    pp_conns: tuple[int, ...] = (1, 64)
    pp_seconds: float = 5.0
    pp_size: int = 100
    conn_seconds: float = 5.0
    conn_threads: int = 4
    conn_count_cap: int = 20_000
    hold_sizes: tuple[int, ...] = (1000, 5000, 9500)
    #: Rows with ``--workers``: one more hold this size, split over two instances (two ports,
    #: two upstream haproxy processes; see perf/upstream.py), 0 = none.
    hold_workers: int = 19_000
    hold_open_timeout: float = 240.0
    pg_scale: int = 10
    pg_clients: tuple[int, ...] = (1, 16, 64)
    pg_seconds: int = 5
    pg_modes: tuple[str, ...] = ("select-only", "tpcb")
    rounds: int = 2  # echo tests are repeated; the report keeps each row's best run
    server_key: str = "ec"  # the upstream's certificate key: "rsa" (2048) or "ec" (P-256)
    io_timeout: int = 30  # the load generator's per-socket-call timeout (a stall costs this)

    @staticmethod
    def make(quick: bool) -> Plan:
        if quick:
            return Plan(
                quick=True,
                bulk_bytes=384 * 2**20,
                bulk_time_cap=30.0,
                io_timeout=10,
                pp_seconds=1.0,
                conn_seconds=1.0,
                hold_sizes=(1000,),
                hold_workers=0,
                hold_open_timeout=60.0,
                rounds=1,
                pg_scale=1,
                pg_clients=(16,),
                pg_seconds=2,
            )
        return Plan(quick=False, bulk_bytes=2**30, pp_seconds=3.0, conn_seconds=3.0)


class Progress:
    """One status line on stderr: step i of n, elapsed time, what runs now."""

    def __init__(self, total: int) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        self.show(label)

    def show(self, label: str) -> None:
        line = f"[{self.done:3d}/{self.total}] {time.monotonic() - self.t0:5.0f}s  {label}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line[:150])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def note(self, text: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
        sys.stderr.flush()


@dataclass
class Env:
    plan: Plan
    workdir: Path
    loadgen: Path
    upstream: Upstream
    progress: Progress
    records: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def record(self, **rec: Any) -> dict[str, Any]:
        self.records.append(rec)
        return rec


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- load generator ----------------------------------------------------------------------------
def _loadgen_argv(env: Env, target: Target, port: int, mode: str, *more: str) -> list[str]:
    up = env.upstream
    args = (*more, "--io-timeout", str(env.plan.io_timeout))
    if target.kind == "plain":
        host, p = up.sink_plain
        return [str(env.loadgen), mode, "--host", host, "--port", str(p), *args]
    if target.kind == "direct":
        c = up.certs
        return [
            str(env.loadgen),
            mode,
            "--host",
            up.addresses["echo"],
            "--port",
            str(UPSTREAM_PORT),
            "--tls",
            "--ca",
            str(c.ca),
            "--cert",
            str(c.client_cert),
            "--key",
            str(c.client_key),
            *args,
        ]
    return [str(env.loadgen), mode, "--host", "127.0.0.1", "--port", str(port), *args]


def run_loadgen(argv: list[str], timeout: float) -> dict[str, Any]:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"error": f"exit {r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    if r.stderr.strip():
        result["stderr"] = r.stderr.strip()[-400:]
    if result.get("errors"):
        # Kept in the figures (a stall is a real cost) but listed in the notes.
        result["warning"] = (
            f"{result['errors']} connection(s) failed or stalled (no progress within the "
            "load generator's socket timeout)"
        )
    return result


@dataclass
class Running:
    """A row ready to take load: its proxy process (pid 0 for plain/direct) and port."""

    target: Target
    child: procs.Child | None
    port: int

    @property
    def pid(self) -> int:
        return self.child.pid if self.child is not None else 0


@contextmanager
def rows_running(env: Env, targets: list[Target], service: str) -> Iterator[list[Running]]:
    """Start every row's proxy in front of ``service`` at once (idle proxies cost nothing), so
    the tests can visit the rows round-robin and background noise spreads over all of them."""
    running: list[Running] = []
    try:
        for t in targets:
            if t.kind != "proxy":
                running.append(Running(t, None, 0))
                continue
            try:
                child, (port, *_) = start_proxy(t, env.upstream, service, env.workdir)
            except procs.StartError as exc:
                env.notes.append(f"{t.name}: could not start for {service}: {exc}")
                env.progress.note(f"{t.name}: could not start: {exc}")
                continue
            running.append(Running(t, child, port))
        yield running
    finally:
        for r in running:
            if r.child is None:
                continue
            if not r.child.alive():
                env.notes.append(
                    f"{r.target.name} died during the {service} tests: {r.child.log_tail(300)}"
                )
            procs.stop(r.child)


def measured(env: Env, pid: int, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` and add the CPU seconds the proxy (and the upstream) used meanwhile."""
    up_pids = [c.pid for c in env.upstream.children]
    cpu0 = procs.cpu_seconds(pid) if pid else 0.0
    up0 = sum(procs.cpu_seconds(p) for p in up_pids)
    t0 = time.monotonic()
    result = fn()
    result["wall_s"] = time.monotonic() - t0
    result["upstream_cpu_s"] = sum(procs.cpu_seconds(p) for p in up_pids) - up0
    if pid:
        result["proxy_cpu_s"] = procs.cpu_seconds(pid) - cpu0
        result["proxy_rss"] = procs.rss_bytes(pid)
    return result


# --- sections ----------------------------------------------------------------------------------
def echo_tests(plan: Plan, sections: set[str]) -> list[tuple[str, str, list[str], float]]:
    """(test name, loadgen mode, loadgen args, timeout) for the echo-upstream sections."""
    tests: list[tuple[str, str, list[str], float]] = []
    if "bulk" in sections:
        for direction in ("up", "down"):
            for conns in plan.bulk_conns:
                args = ["--conns", str(conns), "--bytes", str(plan.bulk_bytes)]
                args += ["--duration", str(plan.bulk_time_cap)]
                tests.append((f"{direction}-{conns}", direction, args, plan.bulk_time_cap + 30))
    if "pingpong" in sections:
        for conns in plan.pp_conns:
            args = ["--conns", str(conns), "--size", str(plan.pp_size)]
            args += ["--duration", str(plan.pp_seconds), "--count", "2000000"]
            tests.append((f"pingpong-{conns}", "pingpong", args, plan.pp_seconds + 60))
    if "connrate" in sections:
        args = ["--conns", str(plan.conn_threads), "--size", str(plan.pp_size)]
        args += ["--duration", str(plan.conn_seconds), "--count", str(plan.conn_count_cap)]
        tests.append(("connrate", "connrate", args, plan.conn_seconds + 60))
    return tests


def echo_sections(env: Env, targets: list[Target], sections: set[str]) -> None:
    """Every test on every row, rows visited round-robin, ``plan.rounds`` times."""
    tests = echo_tests(env.plan, sections)
    if not tests:
        return
    with rows_running(env, targets, "echo") as rows:
        for rnd in range(env.plan.rounds):
            for name, mode, args, timeout in tests:
                for row in rows:
                    suffix = f" (round {rnd + 1}/{env.plan.rounds})" if env.plan.rounds > 1 else ""
                    env.progress.step(f"{row.target.name}: {name}{suffix}")
                    if row.child is not None and not row.child.alive():
                        env.record(target=row.target.name, test=name, error="proxy died")
                        continue
                    argv = _loadgen_argv(env, row.target, row.port, mode, *args)
                    res = measured(env, row.pid, partial(run_loadgen, argv, timeout))
                    env.record(target=row.target.name, test=name, round=rnd + 1, **res)


def _read_line(stream: Any, timeout: float) -> str:
    """One line from a pipe, or '' after timeout / EOF."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = stream.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], min(1.0, max(0.0, deadline - time.monotonic())))
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        if b"\n" in buf:
            break
    return buf.decode(errors="replace").split("\n", 1)[0]


def hold_section(env: Env, target: Target) -> None:
    plan = env.plan
    for n in plan.hold_sizes:
        env.progress.step(f"{target.name}: hold {n} idle connections")
        with rows_running(env, [target], "echo") as rows:
            if not rows:
                return
            _hold(env, target, rows[0].pid, [rows[0].port], n)
    if plan.hold_workers and "--workers" in target.fastproxy_args:
        n = plan.hold_workers
        env.progress.step(f"{target.name}: hold {n} idle connections over two instances")
        try:
            child, ports = start_proxy(target, env.upstream, "echo", env.workdir, also="echo2")
        except procs.StartError as exc:
            env.record(target=target.name, test=f"hold-{n}", conns=n, error=str(exc))
            return
        try:
            _hold(env, target, child.pid, ports, n)
        finally:
            procs.stop(child)


def _hold(env: Env, target: Target, pid: int, ports: list[int], n: int) -> None:
    """Hold ``n`` idle connections, split evenly over ``ports`` (one load generator each: a
    process may have 20,000 descriptors), and record the proxy's RSS per connection."""
    plan = env.plan
    # Warm-up: a few connections so lazily built state exists before the baseline.
    for port in ports:
        run_loadgen(
            _loadgen_argv(env, target, port, "connrate", "--conns", "1", "--count", "20"), 60
        )
    time.sleep(0.3)
    rss0, threads0 = procs.rss_bytes(pid), procs.thread_count(pid)
    cpu0 = procs.cpu_seconds(pid)
    shares = [n // len(ports) + (1 if i < n % len(ports) else 0) for i in range(len(ports))]
    rec: dict[str, Any] = {"target": target.name, "test": f"hold-{n}", "conns": n}
    if len(ports) > 1:
        rec["instances"] = len(ports)
    gens: list[procs.Child] = []
    try:
        for i, (port, share) in enumerate(zip(ports, shares, strict=True)):
            argv = _loadgen_argv(
                env,
                target,
                port,
                "hold",
                "--conns",
                str(share),
                "--size",
                str(plan.pp_size),
                "--duration",
                str(plan.hold_open_timeout),
            )
            gens.append(
                procs.start(
                    f"loadgen-hold-{target.name}-{n}-{i}",
                    argv,
                    env.workdir,
                    stdin=subprocess.PIPE,
                    capture_stdout=True,
                )
            )
        ready = failed = 0
        for lg in gens:
            assert lg.proc.stdout is not None
            line = _read_line(lg.proc.stdout, plan.hold_open_timeout + 30)
            if not line.startswith("{"):
                rec["error"] = f"no ready line from loadgen: {line!r} {lg.log_tail(300)}"
                break
            got = json.loads(line)
            ready += int(got.get("ready", 0))
            failed += int(got.get("failed", 0))
            rec["seconds"] = max(float(rec.get("seconds", 0.0)), float(got.get("seconds", 0.0)))
        else:
            rec.update(mode="hold", ready=ready, failed=failed)
            time.sleep(0.5)  # let the proxy settle (threads started, buffers freed)
            rss1 = procs.rss_bytes(pid)
            rec["proxy_rss_before"] = rss0
            rec["proxy_rss_after"] = rss1
            rec["proxy_threads_before"] = threads0
            rec["proxy_threads_after"] = procs.thread_count(pid)
            rec["proxy_cpu_s"] = procs.cpu_seconds(pid) - cpu0
            if ready:
                rec["rss_per_conn"] = (rss1 - rss0) / ready
            if ready < n:
                rec["error"] = f"only {ready} of {n} connections opened"
        for lg in gens:
            with_timeout_close(lg)
    finally:
        for lg in gens:
            procs.stop(lg)
    env.record(**rec)


def with_timeout_close(lg: procs.Child) -> None:
    assert lg.proc.stdin is not None
    try:
        lg.proc.stdin.write(b"\n")
        lg.proc.stdin.flush()
    except OSError:
        pass
    try:
        lg.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
_LAT = re.compile(r"^latency average = ([0-9.]+) ms", re.M)


def pg_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PGPASSWORD=PG_PASSWORD, PGSSLMODE="disable", PGCONNECT_TIMEOUT="15")
    return env


def pgbench_init(env: Env) -> None:
    up = env.upstream
    env.progress.show(f"pgbench -i -s {env.plan.pg_scale}")
    argv = [
        "pgbench",
        "-i",
        "-q",
        "-s",
        str(env.plan.pg_scale),
        "-h",
        "127.0.0.1",
        "-p",
        str(up.pg_port),
        "-U",
        "postgres",
        "postgres",
    ]
    r = subprocess.run(argv, capture_output=True, text=True, env=pg_env(), timeout=300, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"pgbench -i failed: {r.stderr.strip()[-500:]}")


def run_pgbench(argv: list[str], timeout: float) -> dict[str, Any]:
    try:
        r = subprocess.run(
            argv, capture_output=True, text=True, env=pg_env(), timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": "pgbench timed out"}
    tps, lat = _TPS.search(r.stdout), _LAT.search(r.stdout)
    if r.returncode != 0 or not tps:
        return {"error": f"pgbench exit {r.returncode}: {r.stderr.strip()[-300:]}"}
    out: dict[str, Any] = {"tps": float(tps.group(1))}
    if lat:
        out["latency_ms"] = float(lat.group(1))
    m = re.search(r"number of transactions actually processed: (\d+)", r.stdout)
    if m:
        out["transactions"] = int(m.group(1))
    return out


def pgbench_section(env: Env, targets: list[Target]) -> None:
    """pgbench through every row (PostgreSQL itself for plain-tcp), rows round-robin."""
    plan, up = env.plan, env.upstream
    with rows_running(env, [t for t in targets if t.kind != "direct"], "pg") as rows:
        for mode in plan.pg_modes:
            for clients in plan.pg_clients:
                for row in rows:
                    name = row.target.name
                    env.progress.step(f"{name}: pgbench {mode} -c {clients}")
                    port = up.pg_port if row.target.kind == "plain" else row.port
                    argv = ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
                    argv += ["-c", str(clients), "-j", str(min(clients, 2))]
                    argv += ["-T", str(plan.pg_seconds)]
                    if mode == "select-only":
                        argv.append("-S")
                    argv.append("postgres")
                    timeout = plan.pg_seconds + 90
                    res = measured(env, row.pid, partial(run_pgbench, argv, timeout))
                    env.record(target=name, test=f"pg-{mode}-{clients}", clients=clients, **res)


# --- driver ------------------------------------------------------------------------------------
def count_steps(plan: Plan, targets: list[Target], sections: set[str]) -> int:
    n = len(echo_tests(plan, sections)) * len(targets) * plan.rounds
    for t in targets:
        if "hold" in sections and t.kind == "proxy":
            n += len(plan.hold_sizes)
            if plan.hold_workers and "--workers" in t.fastproxy_args:
                n += 1
        if "pgbench" in sections and t.kind != "direct":
            n += len(plan.pg_modes) * len(plan.pg_clients)
    return n


def run_all(
    plan: Plan, targets: list[Target], sections: set[str], build_dir: Path
) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
    """Run everything; returns (records, notes, config). Cleans up whatever happens."""
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="fastproxy-perf-"))
    os.chmod(workdir, 0o700)
    progress = Progress(count_steps(plan, targets, sections))
    upstream: Upstream | None = None
    try:
        progress.show("building sink and loadgen with gcc -O2")
        sink_exe, loadgen_exe = build_tools(build_dir)
        progress.show("generating certificates")
        addresses = choose_addresses()
        certs = generate(workdir, dict(addresses), server_key=plan.server_key)
        upstream = Upstream(workdir, certs, addresses, sink_exe)
        with_pg = "pgbench" in sections
        progress.show("starting sink, haproxy (upstream)" + (", PostgreSQL" if with_pg else ""))
        upstream.start(with_postgres=with_pg)
        env = Env(plan, workdir, loadgen_exe, upstream, progress)
        echo_sections(env, targets, sections)
        if "hold" in sections:
            for t in targets:
                if t.kind == "proxy":
                    hold_section(env, t)
        if with_pg:
            pgbench_init(env)
            pgbench_section(env, targets)
        progress.finish()
        config = {
            "plan": {k: v for k, v in plan.__dict__.items()},
            "sections": sorted(sections),
            "upstream_addresses": addresses,
            "upstream_port": UPSTREAM_PORT,
            "seconds": time.monotonic() - progress.t0,
        }
        return env.records, env.notes, config
    finally:
        procs.stop_all()
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
