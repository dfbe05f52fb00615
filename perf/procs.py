"""Child processes of the load test: start, wait until ready, measure, and always stop.

Every child runs in its own session (process group = its pid), is remembered in a registry,
and is stopped by pid (SIGTERM to its group, then SIGKILL after a grace period) when the
harness ends for any reason: normal exit, exception, Ctrl-C or SIGTERM. CPU and memory are read
from /proc for the child and all its descendants (threads are included by the kernel in a
process's own counters; forked workers are found through their parent pid).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class StartError(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log: Path
    _reader: threading.Thread | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


_children: list[Child] = []
_lock = threading.Lock()


def start(
    name: str,
    argv: Sequence[str],
    logdir: Path,
    *,
    env: dict[str, str] | None = None,
    stdin: int | None = subprocess.DEVNULL,
    capture_stdout: bool = False,
    cwd: Path | None = None,
) -> Child:
    """Start a child in its own session; stderr (and stdout unless captured) go to a log file."""
    log = logdir / f"{name}.log"
    logf = open(log, "ab")  # noqa: SIM115 - the child owns it; closed below after Popen
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=subprocess.PIPE if capture_stdout else logf,
            stderr=logf,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )
    finally:
        logf.close()
    child = Child(name, list(argv), proc, log)
    with _lock:
        _children.append(child)
    return child


def stop(child: Child, grace: float = 3.0) -> None:
    """SIGTERM the child's process group, wait, then SIGKILL it. Idempotent."""
    proc = child.proc
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    else:
        # The leader is gone; its group may still hold workers.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    with _lock:
        if child in _children:
            _children.remove(child)


def stop_all() -> None:
    with _lock:
        children = list(reversed(_children))
    for c in children:
        stop(c, grace=2.0)


def wait_tcp(child: Child | None, host: str, port: int, timeout: float = 20.0) -> None:
    """Wait until something accepts on host:port (and the child is still alive)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise StartError(f"{child.name} exited at start: {child.log_tail()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    what = child.name if child else f"{host}:{port}"
    tail = child.log_tail() if child else ""
    raise StartError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s {tail}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --- /proc measurements ------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """pid and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat_fields(int(entry))
        if f is None:
            continue
        children.setdefault(int(f[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid and its live descendants, plus what reaped children used."""
    total = 0
    for p in descendants(pid):
        f = _stat_fields(p)
        if f is None:
            continue
        # fields after comm: state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Sum of VmRSS over pid and its descendants (shared pages of forked workers count twice)."""
    total = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def thread_count(pid: int) -> int:
    total = 0
    for p in descendants(pid):
        f = _stat_fields(p)
        if f is not None:
            total += int(f[17])
    return total
