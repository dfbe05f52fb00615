"""``--workers N``: N processes, each with its own loop, sharing the listening ports.

Why processes: one selectors loop is one core; TLS and copying are CPU-bound, so the only way for
one proxy to use every core in CPython is more processes. Each TCP listener is bound separately
in every worker with SO_REUSEPORT, so the kernel spreads new connections across the workers'
accept queues (no shared accept lock, no thundering herd); a unix socket cannot be shared that
way, so it is bound once before the fork and every worker accepts on the inherited socket.

Why one refresher per worker, not one shared: a worker then needs nothing from its siblings (no
IPC for keys and certificates, no single point whose failure stalls every worker), each keeps its
private key in its own memory, and the cost is N Admin API calls per refresh interval (one per
instance per worker per ~50 minutes: far below any quota). A rotation reaches every worker
because every worker refreshes on the same schedule.

The first process (worker 0) keeps the health, metrics and admin servers and supervises: it
forwards shutdown signals, and if a worker dies unexpectedly it shuts the whole proxy down with
exit code 1 (a supervisor such as systemd or Kubernetes then restarts it), since forking a
replacement from a process that already runs threads is not safe.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time

log = logging.getLogger("fastproxy")

_PR_SET_PDEATHSIG = 1


def reserve_port(host: str) -> socket.socket:
    """Bind (without listening) a SO_REUSEPORT socket on ``host:0`` so every worker can then
    bind the same, now known, port. The caller closes it once its own listener is bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker if worker 0 disappears (best effort, no dependency)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Workers:
    """The children of worker 0, by pid."""

    def __init__(self) -> None:
        self.children: dict[int, int] = {}  # pid -> worker index
        self.exit_codes: dict[int, int] = {}  # worker index -> exit code, once reaped

    @classmethod
    def fork(cls, count: int) -> tuple[int, Workers | None]:
        """Fork ``count - 1`` children. Returns ``(index, workers)``: index 0 and the set in the
        first process, ``(i, None)`` in child ``i``. Call before any thread is started."""
        workers = cls()
        sys.stdout.flush()
        sys.stderr.flush()
        for index in range(1, count):
            pid = os.fork()
            if pid == 0:
                _die_with_parent()
                return index, None
            workers.children[pid] = index
        return 0, workers

    def signal(self, signum: int) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def reap(self) -> list[tuple[int, int]]:
        """Workers that exited since the last call, as ``(index, exit code)``; never blocks."""
        done: list[tuple[int, int]] = []
        for pid in list(self.children):
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = pid, 0
            if got == 0:
                continue
            index = self.children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            self.exit_codes[index] = code
            done.append((index, code))
        return done

    def wait(self, timeout: float) -> None:
        """Wait for every worker to exit; SIGKILL the ones still running after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.children and time.monotonic() < deadline:
            self.reap()
            if self.children:
                time.sleep(0.05)
        if self.children:
            log.error("%d workers did not exit in time; killing them", len(self.children))
            self.signal(signal.SIGKILL)
            while self.children:
                self.reap()
                time.sleep(0.01)
