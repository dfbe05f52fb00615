"""Listening sockets: TCP (127.0.0.1 by default) and unix, batched accept, pause and resume.

Accepting stops in two situations, and in both the pending clients wait in the kernel's backlog
rather than being accepted and closed:

* the max-connections gate is full (the proxy pauses every listener until a connection closes);
* the process is out of descriptors (EMFILE/ENFILE): accepting again at once would spin, since the
  listening socket stays readable; the listener pauses until a descriptor is freed (a connection
  closes) or, as a fallback when descriptors were freed elsewhere, a timer fires.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fastproxy.errors import ConfigError

if TYPE_CHECKING:
    from fastproxy.loop import Loop
    from fastproxy.source import ConnectionInfoSource
    from fastproxy.stats import Stats

log = logging.getLogger("fastproxy.listener")

ACCEPT_BATCH = 64  # bounded so one busy listener cannot starve established connections
BACKLOG = 4096
EMFILE_RETRY_S = 1.0

AcceptCallback = Callable[["Listener", socket.socket, str], None]


class Listener:
    """One listening socket bound to one connection-info source."""

    def __init__(
        self,
        sock: socket.socket,
        source: ConnectionInfoSource,
        description: str,
        unix_path: Path | None = None,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.source = source
        self.description = description
        self.unix_path = unix_path
        self.loop: Loop | None = None
        self.on_accept: AcceptCallback | None = None
        self.can_accept: Callable[[], bool] = lambda: True
        self.paused_for_fds = False
        self.paused_for_gate = False
        self._registered_read = False
        self.stats: Stats | None = None
        # One warning per stall: set when we first run out of descriptors, cleared only once the
        # backlog has been drained (accept says EAGAIN), so the fallback retries stay quiet.
        self._fd_stall = False

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def tcp(
        cls, address: str, port: int, source: ConnectionInfoSource, *, reuse_port: bool = False
    ) -> Listener:
        """``reuse_port``: SO_REUSEPORT, so worker processes each bind their own socket to the
        same port and the kernel spreads new connections across them."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address, port))
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot listen on {address}:{port} for {source.name}: {exc.strerror or exc}"
            ) from exc
        sock.setblocking(False)
        host, bound = sock.getsockname()[:2]
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        return cls(sock, source, f"{shown}:{bound}")

    @classmethod
    def unix(
        cls,
        path: Path,
        source: ConnectionInfoSource,
        *,
        sock: socket.socket | None = None,
        owner: bool = True,
    ) -> Listener:
        """A listener on the unix socket ``path``. ``sock``: one already bound by
        :meth:`bind_unix` (shared by worker processes); only the ``owner`` removes the file when
        it closes."""
        if sock is None:
            sock = cls.bind_unix(path, source.name)
        return cls(sock, source, str(path), unix_path=path if owner else None)

    @staticmethod
    def bind_unix(path: Path, name: str) -> socket.socket:
        """Bind and listen on ``path`` (mode 0777; a stale socket file is replaced)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() or path.is_symlink():
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    raise ConfigError(f"{path} exists and is not a socket; refusing to remove it")
                path.unlink()  # a stale socket from an earlier run
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(str(path))
                os.chmod(path, 0o777)  # as the Auth Proxy: any local user may connect
                sock.listen(BACKLOG)
            except OSError:
                sock.close()
                raise
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on unix socket {path} for {name}: {exc.strerror or exc}"
            ) from exc
        sock.setblocking(False)
        return sock

    @property
    def port(self) -> int:
        return 0 if self.sock.family == socket.AF_UNIX else int(self.sock.getsockname()[1])

    # -- loop integration -----------------------------------------------------------------
    def attach(
        self,
        loop: Loop,
        on_accept: AcceptCallback,
        can_accept: Callable[[], bool],
        stats: Stats | None = None,
    ) -> None:
        self.loop = loop
        self.on_accept = on_accept
        self.can_accept = can_accept
        self.stats = stats
        loop.register(self.sock, self, True, False)
        self._registered_read = True

    def _set_reading(self, on: bool) -> None:
        if self.loop is None or on == self._registered_read:
            return
        self._registered_read = on
        self.loop.modify(self.fd, on, False)

    def pause_for_gate(self) -> None:
        if not self.paused_for_gate and self.stats is not None:
            self.stats.accept_paused += 1
        self.paused_for_gate = True
        self._set_reading(False)

    def resume(self) -> None:
        """A descriptor or a connection slot was freed: accept again if nothing else blocks."""
        self.paused_for_gate = False
        self.paused_for_fds = False
        self._set_reading(True)

    def on_writable(self) -> None:  # never registered for writing
        pass

    def on_readable(self) -> None:
        assert self.on_accept is not None and self.loop is not None
        for _ in range(ACCEPT_BATCH):
            if self.paused_for_fds:  # the last accepted connection could not get a descriptor
                return
            if not self.can_accept():
                self.pause_for_gate()
                return
            try:
                client, addr = self.sock.accept()
            except BlockingIOError:
                self._fd_stall = False  # caught up with the backlog: any stall is over
                return
            except InterruptedError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.pause_for_fds(exc.strerror or str(exc))
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up while in the backlog
                log.warning("accept on %s failed: %s", self.description, exc)
                return
            peer = _peer_name(addr)
            self.on_accept(self, client, peer)

    def pause_for_fds(self, detail: str) -> None:
        """Stop accepting until a descriptor is freed (or the fallback timer fires)."""
        if self.paused_for_fds:
            return
        if self.stats is not None:
            self.stats.emfile_events += 1
            self.stats.accept_paused += 1
        if not self._fd_stall:
            self._fd_stall = True
            log.warning(
                "out of file descriptors accepting on %s (%s): pausing accepts until one is freed",
                self.description,
                detail,
            )
        self.paused_for_fds = True
        self._set_reading(False)
        assert self.loop is not None
        self.loop.call_later(EMFILE_RETRY_S, self._retry_after_emfile)

    def _retry_after_emfile(self) -> None:
        if self.paused_for_fds and not self.paused_for_gate:
            self.paused_for_fds = False
            self._set_reading(True)

    def close(self) -> None:
        if self.loop is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.loop.unregister(self.fd)
        self.sock.close()
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                self.unix_path.unlink()


def _peer_name(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "unix"
