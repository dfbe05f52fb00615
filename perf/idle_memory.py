"""Proxy RSS per idle connection: ``python -m perf.idle_memory --connections N``.

Starts the AlloyDB emulator with the echo backend and fastproxy (``--static-connection-info``) as
subprocesses on loopback, opens N client connections through the proxy (at most ``--concurrency``
handshaking at once), does one 100-byte echo on each, leaves them all open and idle, and reads the
proxy's ``VmRSS`` from ``/proc``. An idle connection here is: client connected, TLS 1.3 session to
the upstream established, metadata exchange done, one small round trip done, nothing in flight.

Prints RSS before (proxy ready, no connection yet), after (N idle connections) and the difference
per connection in KiB; then closes the clients and prints the RSS once the proxy has closed them
too (what the allocator kept). ``--json`` prints the same as one JSON object.

Profiling aids (they change the proxy's memory, so never compare them with plain runs):

* ``--malloc-stats``: the proxy reports glibc ``mallinfo2()`` before and after (heap in use, free
  heap kept, mmapped blocks), so the C side can be told from the Python side.
* ``--tracemalloc FRAMES``: the proxy traces Python allocations and the script prints the top
  allocation sites grown between before and after, per connection (needs ``--malloc-stats``'s
  bootstrap as well, implied).
* ``--wrapper CMD``: run the proxy under CMD (e.g. ``"heaptrack -o /tmp/hp"``); RSS is then read
  from the wrapper's descendant python.
* ``--proxy-env K=V`` / ``--proxy-arg ARG``: environment (``MALLOC_ARENA_MAX=1``) or flags for the
  proxy, to compare variants.

Bounded: N <= 9,500 (the hard descriptor limit is 20,000 per process, the proxy needs two per
connection), every wait has a deadline, everything listens on 127.0.0.1, and every child is
stopped on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import resource
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEMO_URI = (
    "projects/demo-project/locations/us-central1/clusters/demo-cluster/instances/demo-primary"
)
TOKEN = "echo-token"
MAX_CONNECTIONS = 9_500
READY_TIMEOUT_S = 60.0
RUN_DEADLINE_S = 900.0
STATS_TIMEOUT_S = 120.0

# Run in the proxy child for --malloc-stats / --tracemalloc: on SIGUSR2 write mallinfo2 (and a
# tracemalloc snapshot) to files named by the request counter, then run the proxy's own main().
_BOOTSTRAP = r"""
import ctypes, gc, json, os, pickle, signal, sys, time, tracemalloc
out = os.environ.pop("IDLE_MEMORY_OUT")
frames = int(os.environ.pop("IDLE_MEMORY_TRACEMALLOC", "0"))
if frames:
    tracemalloc.start(frames)

class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

_libc = ctypes.CDLL(None)
_mallinfo2 = getattr(_libc, "mallinfo2", None)
if _mallinfo2 is not None:
    _mallinfo2.restype = _MallInfo2
_count = [0]

def _dump(signum, frame):
    _count[0] += 1
    n = _count[0]
    gc.collect()
    trim_s = None
    if os.path.exists(f"{out}/trim-{n}"):
        t0 = time.perf_counter()
        _libc.malloc_trim(0)
        trim_s = time.perf_counter() - t0
    info = {"trim_seconds": trim_s}
    if _mallinfo2 is not None:
        m = _mallinfo2()
        info.update({name: getattr(m, name) for name, _ in _MallInfo2._fields_})
    info["gc_objects"] = len(gc.get_objects())
    info["gc_frozen"] = gc.get_freeze_count()
    if frames:
        info["tracemalloc_traced"] = tracemalloc.get_traced_memory()[0]
        with open(f"{out}/snap-{n}.pickle.tmp", "wb") as f:
            pickle.dump(tracemalloc.take_snapshot(), f)
        os.replace(f"{out}/snap-{n}.pickle.tmp", f"{out}/snap-{n}.pickle")
    with open(f"{out}/stats-{n}.json.tmp", "w") as f:
        json.dump(info, f)
    os.replace(f"{out}/stats-{n}.json.tmp", f"{out}/stats-{n}.json")

signal.signal(signal.SIGUSR2, _dump)
from fastproxy.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of ``pid`` in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _python_descendant(pid: int) -> int:
    """With --wrapper the proxy is a descendant of the started process: find the python one."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        todo, seen = [pid], []
        while todo:
            p = todo.pop()
            seen.append(p)
            try:
                children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            except OSError:
                children = []
            todo.extend(int(c) for c in children)
        for p in seen:
            try:
                exe = os.readlink(f"/proc/{p}/exe")
            except OSError:
                continue
            if "python" in os.path.basename(exe):
                return p
        time.sleep(0.1)
    raise RuntimeError(f"no python process under {pid}")


class Children:
    """Every process started here, stopped (TERM, then KILL) on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(argv, cwd=str(REPO), **kw)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_emulator(children: Children, work: Path) -> dict[str, Any]:
    ready = work / "emulator-ready.json"
    log = open(work / "emulator.log", "wb")  # noqa: SIM115 - lives as long as the child
    proc = children.start(
        [
            sys.executable, "-m", "fastproxy.emulator", "--ready-file", str(ready),
            "--backend", "echo", "--token", f"{TOKEN}=echo@example.com",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError("emulator exited: " + (work / "emulator.log").read_text())
        if time.monotonic() > deadline:
            raise RuntimeError("emulator not ready in time")
        time.sleep(0.05)
    info: dict[str, Any] = json.loads(ready.read_text())
    return info


def write_static(info: dict[str, Any], work: Path) -> Path:
    from fastproxy.emulator.static_info import build_static_info, write_private_json

    data = build_static_info(
        str(info["admin_endpoint"]), TOKEN, [i["uri"] for i in info["instances"]]
    )
    path = work / "static.json"
    write_private_json(path, data)
    return path


def start_proxy(
    children: Children, static: Path, args: argparse.Namespace, work: Path
) -> tuple[subprocess.Popen[str], int, int, list[str]]:
    """Start the proxy; returns (process, pid of the python proxy, port, output lines)."""
    proxy_args = [
        DEMO_URI, "--static-connection-info", str(static), "--token", TOKEN, "--port", "0",
        *args.proxy_arg,
    ]
    env = dict(os.environ)
    for kv in args.proxy_env:
        key, _, value = kv.partition("=")
        env[key] = value
    if args.malloc_stats or args.tracemalloc:
        env["IDLE_MEMORY_OUT"] = str(work)
        env["IDLE_MEMORY_TRACEMALLOC"] = str(args.tracemalloc)
        argv = [sys.executable, "-c", _BOOTSTRAP, *proxy_args]
    else:
        argv = [sys.executable, "-m", "fastproxy", *proxy_args]
    if args.wrapper:
        argv = [*shlex.split(args.wrapper), *argv]
    proc = children.start(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    lines: list[str] = []
    port = 0
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("proxy not ready in time:\n" + "".join(lines))
            if not sel.select(left):
                continue
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("proxy exited:\n" + "".join(lines))
            lines.append(line)
            m = re.search(r"Listening on \S+:(\d+) ", line)
            if m and not port:
                port = int(m.group(1))
            if "ready for new connections" in line:
                break
    finally:
        sel.close()

    def drain() -> None:
        assert proc.stdout is not None
        for ln in proc.stdout:
            lines.append(ln)

    threading.Thread(target=drain, daemon=True).start()
    pid = _python_descendant(proc.pid) if args.wrapper else proc.pid
    return proc, pid, port, lines


def open_idle_connections(
    port: int, n: int, concurrency: int, payload: int, deadline: float
) -> list[socket.socket]:
    """N connections, each with one echoed ``payload``-byte message; at most ``concurrency``
    waiting for their echo at any time. Returns them all open."""
    sel = selectors.DefaultSelector()
    done: list[socket.socket] = []
    waiting: dict[int, tuple[socket.socket, bytes, bytearray]] = {}
    opened = 0
    try:
        while len(done) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(done)} of {n} connections echoed in time")
            while opened < n and len(waiting) < concurrency:
                s = socket.create_connection(("127.0.0.1", port), timeout=30)
                s.setblocking(False)
                msg = (b"%08d" % opened) * (payload // 8 + 1)
                msg = msg[:payload]
                s.send(msg)  # a few hundred bytes always fit an empty socket buffer
                waiting[s.fileno()] = (s, msg, bytearray())
                sel.register(s, selectors.EVENT_READ)
                opened += 1
            for key, _ in sel.select(timeout=5):
                s, msg, got = waiting[key.fd]
                data = s.recv(4096)
                if not data:
                    raise RuntimeError(f"connection {len(done)} closed before its echo")
                got += data
                if len(got) >= len(msg):
                    if bytes(got) != msg:
                        raise RuntimeError("echo mismatch")
                    sel.unregister(s)
                    del waiting[key.fd]
                    done.append(s)
    except BaseException:
        for s in done:
            s.close()
        for s, _, _ in waiting.values():
            s.close()
        raise
    finally:
        sel.close()
    return done


def request_stats(pid: int, work: Path, n: int) -> dict[str, Any]:
    """Ask the bootstrapped proxy for mallinfo2 (+ tracemalloc snapshot) number ``n``."""
    os.kill(pid, signal.SIGUSR2)
    path = work / f"stats-{n}.json"
    deadline = time.monotonic() + STATS_TIMEOUT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the proxy did not write its malloc statistics")
        time.sleep(0.05)
    stats: dict[str, Any] = json.loads(path.read_text())
    return stats


def wait_settled(pid: int, seconds: float) -> dict[str, int]:
    """Wait ``seconds``, then until VmRSS stops moving (at most 10 s more); return the status."""
    time.sleep(seconds)
    last = status_kib(pid)
    for _ in range(20):
        time.sleep(0.5)
        now = status_kib(pid)
        if abs(now["VmRSS"] - last["VmRSS"]) < 64:
            return now
        last = now
    return last


def _mallinfo_line(before: dict[str, Any], after: dict[str, Any], n: int) -> str:
    def d(key: str) -> float:
        return (int(after.get(key, 0)) - int(before.get(key, 0))) / 1024 / n

    return (
        f"  mallinfo2 per connection: in use (uordblks) {d('uordblks'):+.2f} KiB, "
        f"free kept (fordblks) {d('fordblks'):+.2f} KiB, mmapped (hblkhd) {d('hblkhd'):+.2f} KiB, "
        f"heap (arena) {d('arena'):+.2f} KiB; gc objects "
        f"{(after['gc_objects'] - before['gc_objects']) / n:+.1f}"
    )


def _tracemalloc_report(work: Path, n: int, top: int) -> list[str]:
    import tracemalloc

    with open(work / "snap-1.pickle", "rb") as f:
        first: tracemalloc.Snapshot = pickle.load(f)
    with open(work / "snap-2.pickle", "rb") as f:
        second: tracemalloc.Snapshot = pickle.load(f)
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    first, second = first.filter_traces(filters), second.filter_traces(filters)
    lines = []
    total = sum(s.size for s in second.statistics("filename")) - sum(
        s.size for s in first.statistics("filename")
    )
    lines.append(f"  tracemalloc: Python heap {total / 1024 / n:+.2f} KiB per connection")
    for stat in second.compare_to(first, "traceback")[:top]:
        if stat.size_diff <= 0:
            continue
        frames = " <- ".join(
            f"{Path(fr.filename).name}:{fr.lineno}" for fr in reversed(stat.traceback[-5:])
        )
        lines.append(
            f"    {stat.size_diff / n:8.1f} B/conn {stat.count_diff / n:6.2f} blocks/conn  {frames}"
        )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m perf.idle_memory", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("--connections", type=int, default=1000, help="idle connections (<= 9500)")
    p.add_argument("--concurrency", type=int, default=100,
                   help="connections waiting for their echo at once (9500: all at once, like "
                   "tests/test_scale.py)")
    p.add_argument("--payload", type=int, default=100, help="bytes echoed once per connection")
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait before reading RSS")
    p.add_argument("--malloc-stats", action="store_true", help="report glibc mallinfo2")
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                   help="trace Python allocations with this many frames and print top sites")
    p.add_argument("--top", type=int, default=25, help="tracemalloc sites to print")
    p.add_argument("--trim", action="store_true",
                   help="with --malloc-stats: after closing, call malloc_trim(0) in the proxy and "
                   "report the RSS it gives back")
    p.add_argument("--wrapper", default="", help="command prefix for the proxy (e.g. heaptrack)")
    p.add_argument("--hold", type=float, default=0.0,
                   help="seconds to keep the connections open after measuring (to attach tools)")
    p.add_argument("--proxy-env", action="append", default=[], metavar="K=V")
    p.add_argument("--proxy-arg", action="append", default=[], metavar="ARG")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if not 1 <= args.connections <= MAX_CONNECTIONS:
        p.error(f"--connections must be 1..{MAX_CONNECTIONS}")
    if not 1 <= args.concurrency <= MAX_CONNECTIONS:
        p.error(f"--concurrency must be 1..{MAX_CONNECTIONS}")
    if not 1 <= args.payload <= 4096:
        p.error("--payload must be 1..4096")
    if not 0 <= args.hold <= 3600:
        p.error("--hold must be 0..3600")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.connections + 200
    if hard < need:
        print(f"need {need} descriptors, the hard limit is {hard}", file=sys.stderr)
        return 2
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the children

    children = Children()
    socks: list[socket.socket] = []
    result: dict[str, Any] = {"connections": args.connections}
    try:
        with tempfile.TemporaryDirectory(prefix="idle-memory-") as tmp:
            work = Path(tmp)
            info = start_emulator(children, work)
            static = write_static(info, work)
            proc, pid, port, lines = start_proxy(children, static, args, work)
            bootstrapped = args.malloc_stats or args.tracemalloc
            before = wait_settled(pid, args.settle)
            m_before = request_stats(pid, work, 1) if bootstrapped else None
            if m_before is not None:
                before = status_kib(pid)

            t0 = time.monotonic()
            socks = open_idle_connections(
                port, args.connections, args.concurrency, args.payload, t0 + RUN_DEADLINE_S
            )
            opened_s = time.monotonic() - t0
            after = wait_settled(pid, args.settle)
            fds = fd_count(pid)
            m_after = request_stats(pid, work, 2) if bootstrapped else None
            n = args.connections
            per_conn = (after["VmRSS"] - before["VmRSS"]) / n
            result.update(
                before_kib=before, after_kib=after, per_connection_kib=round(per_conn, 2),
                proxy_fds=fds, open_seconds=round(opened_s, 1),
            )
            report = [
                f"idle memory: {n} connections opened and echoed ({args.payload} B each) in "
                f"{opened_s:.1f} s; proxy holds {fds} descriptors",
                f"  proxy VmRSS before {before['VmRSS']} KiB, after {after['VmRSS']} KiB "
                f"(RssAnon {before.get('RssAnon', 0)} -> {after.get('RssAnon', 0)} KiB)",
                f"  per connection: {per_conn:.2f} KiB "
                f"(anonymous {(after.get('RssAnon', 0) - before.get('RssAnon', 0)) / n:.2f} KiB)",
            ]
            if m_before is not None and m_after is not None:
                result["mallinfo_before"], result["mallinfo_after"] = m_before, m_after
                report.append(_mallinfo_line(m_before, m_after, n))
            if args.tracemalloc:
                report.extend(_tracemalloc_report(work, n, args.top))
            k = 3  # the next statistics request
            if m_before is not None and args.trim:
                (work / f"trim-{k}").touch()
                trim_s = request_stats(pid, work, k)["trim_seconds"]
                k += 1
                idle_trimmed = status_kib(pid)
                result["idle_trimmed_kib"] = idle_trimmed
                report.append(
                    f"  idle, after malloc_trim(0) (took {trim_s * 1000:.1f} ms): VmRSS "
                    f"{idle_trimmed['VmRSS']} KiB "
                    f"({(idle_trimmed['VmRSS'] - before['VmRSS']) / n:.2f} KiB per connection)"
                )
            if args.hold:
                print(f"holding {n} connections for {args.hold:.0f} s (proxy pid {pid})",
                      file=sys.stderr, flush=True)
                time.sleep(args.hold)

            for s in socks:
                s.close()
            socks = []
            deadline = time.monotonic() + 60
            while fd_count(pid) > fds - 2 * n + 50 and time.monotonic() < deadline:
                time.sleep(0.2)
            closed = wait_settled(pid, args.settle)
            result["closed_kib"] = closed
            if m_before is not None:
                m_closed = request_stats(pid, work, k)
                k += 1
                result["mallinfo_closed"] = m_closed
                report.append(
                    f"  after closing: malloc in use {m_closed['uordblks'] / 1024:.0f} KiB "
                    f"(before {m_before['uordblks'] / 1024:.0f}), free kept "
                    f"{m_closed['fordblks'] / 1024:.0f} KiB, gc objects {m_closed['gc_objects']}"
                )
            report.append(
                f"  after closing them: VmRSS {closed['VmRSS']} KiB "
                f"({(closed['VmRSS'] - before['VmRSS']) / n:.2f} KiB per connection kept)"
            )
            if m_before is not None and args.trim:
                (work / f"trim-{k}").touch()
                trim_s = request_stats(pid, work, k)["trim_seconds"]
                trimmed = status_kib(pid)
                result["trimmed_kib"] = trimmed
                report.append(
                    f"  after malloc_trim(0) (took {trim_s * 1000:.1f} ms): VmRSS "
                    f"{trimmed['VmRSS']} KiB "
                    f"({(trimmed['VmRSS'] - before['VmRSS']) / n:.2f} KiB per connection kept)"
                )
            trims = [ln.strip() for ln in lines if "Heap trimmed" in ln]
            if trims:  # logged with --proxy-arg=--debug-logs
                report.append(f"  the proxy trimmed its heap {len(trims)} times:")
                report.extend(f"    {ln}" for ln in trims[-5:])
            if proc.poll() is not None:
                raise RuntimeError("the proxy exited:\n" + "".join(lines[-30:]))
            if args.json:
                print(json.dumps(result))
            else:
                print("\n".join(report))
    finally:
        for s in socks:
            s.close()
        children.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
