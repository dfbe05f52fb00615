"""The embeddable forwarding loop: listeners bound to connection-info sources, one thread.

Library use::

    from fastproxy import Proxy, Listener, StaticSource

    proxy = Proxy([Listener.tcp("127.0.0.1", 5432, source)], max_connections=1000)
    proxy.start()            # a background thread; or proxy.run() in the caller's thread
    ...
    print(proxy.stats())     # counters snapshot
    proxy.stop()             # thread-safe; closes listeners and every connection

Everything the loop owns (sockets, the buffer pool, connections, counters) is touched only on the
loop thread; other threads come in through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from fastproxy.buffers import BufferPool
from fastproxy.connection import Connection, Shared
from fastproxy.listener import Listener
from fastproxy.loop import Loop
from fastproxy.stats import Stats

log = logging.getLogger("fastproxy.proxy")

DEFAULT_SLAB_SIZE = 64 * 1024
# 256 x 64 KiB = 16 MiB preallocated, growing by whole arenas up to 8 x that (128 MiB) under load;
# past that the pool itself applies backpressure (reads pause until slabs come back).
DEFAULT_SLAB_COUNT = 256
DEFAULT_MAX_ARENAS = 8


class Proxy:
    """A set of listeners served by one selectors loop."""

    def __init__(
        self,
        listeners: Sequence[Listener],
        *,
        max_connections: int = 0,
        dial_timeout: float = 30.0,
        exchange_timeout: float = 30.0,
        slab_size: int = DEFAULT_SLAB_SIZE,
        slab_count: int = DEFAULT_SLAB_COUNT,
        high_water: int = 256 * 1024,
        low_water: int = 64 * 1024,
        loop: Loop | None = None,
    ) -> None:
        self.loop = loop or Loop()
        self.listeners = list(listeners)
        self.max_connections = max_connections
        self.pool = BufferPool(
            slab_size=slab_size, slab_count=slab_count, max_arenas=DEFAULT_MAX_ARENAS
        )
        self.stats_counters = Stats()
        self._resolver_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.shared = Shared(
            self.loop,
            self.pool,
            self.stats_counters,
            dial_timeout=dial_timeout,
            exchange_timeout=exchange_timeout,
            high_water=high_water,
            low_water=low_water,
            resolver=self._resolve,
            on_close=self._on_connection_closed,
            on_out_of_fds=self._on_out_of_fds,
        )
        self.connections: set[Connection] = set()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.ready = threading.Event()
        # One spare descriptor, released when a client was accepted with the last free one and its
        # upstream socket cannot be opened: that client is served instead of dropped, and accepting
        # pauses. Re-taken when a connection closes, before accepting resumes.
        self._reserve_fd = _open_reserve()
        for listener in self.listeners:
            listener.attach(self.loop, self._on_accept, self._can_accept, self.stats_counters)

    # -- accepting ------------------------------------------------------------------------
    def _can_accept(self) -> bool:
        return not self._stopping and (
            self.max_connections <= 0 or len(self.connections) < self.max_connections
        )

    def _on_accept(self, listener: Listener, client: socket.socket, peer: str) -> None:
        client.setblocking(False)
        if client.family != socket.AF_UNIX:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(self.shared, client, peer, listener.source)
        self.connections.add(conn)
        self.stats_counters.opened()
        conn.start()

    def _on_connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self._stopping:
            return
        if self._reserve_fd < 0:
            self._reserve_fd = _open_reserve()
        # A slot and a descriptor were freed: resume listeners paused for either reason.
        for listener in self.listeners:
            if listener.paused_for_fds or (listener.paused_for_gate and self._can_accept()):
                listener.resume()

    def _on_out_of_fds(self) -> bool:
        for listener in self.listeners:
            listener.pause_for_fds("no descriptor left for an upstream socket")
        if self._reserve_fd < 0:
            return False
        os.close(self._reserve_fd)
        self._reserve_fd = -1
        return True

    # -- name resolution off the loop thread (PSC DNS names) -------------------------------
    def _resolve(self, host: str, port: int, done: Callable[[list[str] | Exception], None]) -> None:
        if self._resolver_pool is None:
            self._resolver_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=4, thread_name_prefix="fastproxy-dns"
            )

        def work() -> None:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                result: list[str] | Exception = [str(i[4][0]) for i in infos]
            except OSError as exc:
                result = exc
            self.loop.call_soon_threadsafe(done, result)

        self._resolver_pool.submit(work)

    # -- running --------------------------------------------------------------------------
    def run(self) -> None:
        """Serve in the calling thread until :meth:`stop`."""
        self.ready.set()
        try:
            self.loop.run()
        finally:
            self._close_everything()

    def start(self) -> threading.Thread:
        """Serve in a background thread; returns it (already started)."""
        self._thread = threading.Thread(target=self.run, name="fastproxy-loop", daemon=True)
        self._thread.start()
        self.ready.wait()
        return self._thread

    def stop(self) -> None:
        """Stop accepting, close every connection and end :meth:`run`. Any thread."""
        self.loop.call_soon_threadsafe(self._stop_on_loop)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _stop_on_loop(self) -> None:
        self._stopping = True
        self.loop.stop()

    def _close_everything(self) -> None:
        self._stopping = True
        for listener in self.listeners:
            listener.close()
        for conn in list(self.connections):
            conn.close("proxy shutting down", error=False)
        if self._resolver_pool is not None:
            self._resolver_pool.shutdown(wait=False, cancel_futures=True)
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1
        self.loop.close()

    # -- observing ------------------------------------------------------------------------
    @property
    def is_stopping(self) -> bool:
        """True once :meth:`stop` has taken effect (or the loop has ended); any thread."""
        return self._stopping

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (safe from any thread; values may be a moment apart)."""
        snap = self.stats_counters.snapshot()
        snap["pool_in_use"] = self.pool.in_use
        snap["pool_capacity"] = self.pool.capacity
        return snap


def _open_reserve() -> int:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1
