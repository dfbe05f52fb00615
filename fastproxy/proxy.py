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
import ctypes
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastproxy.buffers import BufferPool
from fastproxy.connection import Connection, Shared, State
from fastproxy.listener import Listener
from fastproxy.loop import Loop
from fastproxy.stats import MetricsSnapshot, Stats, instance_snapshots

log = logging.getLogger("fastproxy.proxy")

DEFAULT_SLAB_SIZE = 64 * 1024
# 256 x 64 KiB = 16 MiB preallocated, growing by whole arenas up to 8 x that (128 MiB) under load;
# past that the pool itself applies backpressure (reads pause until slabs come back).
DEFAULT_SLAB_COUNT = 256
DEFAULT_MAX_ARENAS = 8
#: The loop wakes at least this often even when idle, so its heartbeat (``Loop.heartbeat``) keeps
#: moving and a liveness check can tell "idle" from "wedged".
HEARTBEAT_INTERVAL = 1.0
#: Heap trimming. glibc keeps the memory a program frees (it returns only the top of a heap), and
#: the proxy frees a lot in bursts that leave holes between live blocks: a TLS handshake frees its
#: transient state (OpenSSL's handshake buffer, the flights in the BIOs) once done, and a closed
#: connection ~45 KiB. Measured with perf/idle_memory.py --trim: 9,500 connections
#: opened at once left 11 KiB per connection of free heap in RSS (57 KiB per idle connection
#: instead of 48), and after they all closed RSS stayed at its peak (+44 KiB per closed
#: connection); one ``malloc_trim(0)`` gave that back in 14 and 27 ms. So a heartbeat trims the
#: heap once at least TRIM_AFTER_SESSIONS sessions have finished their handshake or closed since
#: the last trim, provided fewer than TRIM_QUIET_ACCEPTS connections were accepted during the last
#: heartbeat interval (the burst is over; under sustained churn the freed memory is simply reused).
TRIM_AFTER_SESSIONS = 1000
TRIM_QUIET_ACCEPTS = 100


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another libc, or no ctypes access to it)."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    trim: Callable[[int], int] = fn
    return trim


_malloc_trim = _find_malloc_trim()


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
        worker_index: int = 0,
    ) -> None:
        self.loop = loop or Loop()
        #: which worker process this is (``--workers``); exported as ``worker_info{worker=...}``
        self.worker_index = worker_index
        #: ``threading.get_ident()`` of the thread running the loop, once :meth:`run` started
        self.loop_thread_ident: int | None = None
        # High-water marks of the byte counters /metrics reported (see metrics_snapshot).
        self._bytes_lock = threading.Lock()
        self._bytes_seen: dict[str, tuple[int, int]] = {}
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
        # Heap trimming (see TRIM_AFTER_SESSIONS): handshakes finished + connections closed at the
        # last trim, and connections accepted as of the previous heartbeat.
        self._trim_sessions = 0
        self._tick_accepted = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False  # listeners closed, open connections still served
        self.ready = threading.Event()
        # One spare descriptor, released when a client was accepted with the last free one and its
        # upstream socket cannot be opened: that client is served instead of dropped, and accepting
        # pauses. Re-taken when a connection closes, before accepting resumes.
        self._reserve_fd = _open_reserve()
        for listener in self.listeners:
            listener.attach(self.loop, self._on_accept, self._can_accept, self.stats_counters)

    # -- accepting ------------------------------------------------------------------------
    def _can_accept(self) -> bool:
        return not (self._stopping or self._draining) and (
            self.max_connections <= 0 or len(self.connections) < self.max_connections
        )

    def _on_accept(self, listener: Listener, client: socket.socket, peer: str) -> None:
        client.setblocking(False)
        if client.family != socket.AF_UNIX:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(self.shared, client, peer, listener.source)
        self.connections.add(conn)
        self.stats_counters.opened(conn.counters)
        conn.start()

    def _on_connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self._stopping or self._draining:
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
        self.loop_thread_ident = threading.get_ident()
        self.loop.call_later(HEARTBEAT_INTERVAL, self._tick)
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

    def stop_accepting(self) -> None:
        """Close every listener (new clients are refused by the kernel) and keep serving the open
        connections: the drain phase of a graceful shutdown. Any thread."""
        self.loop.call_soon_threadsafe(self._stop_accepting_on_loop)

    def _stop_accepting_on_loop(self) -> None:
        self._draining = True
        for listener in self.listeners:
            listener.close()

    @property
    def active_connections(self) -> int:
        """Open client connections (a plain int read: any thread)."""
        return len(self.connections)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _tick(self) -> None:
        """Keep an idle loop iterating (its heartbeat is what /liveness checks); trim the heap
        after a burst of handshakes or closes."""
        stats = self.stats_counters
        sessions = stats.connected_total + stats.closed_ok + stats.closed_error
        accepted = stats.accepted
        if (
            sessions - self._trim_sessions >= TRIM_AFTER_SESSIONS
            and accepted - self._tick_accepted < TRIM_QUIET_ACCEPTS
        ):
            self._trim_sessions = sessions
            self._trim_heap()
        self._tick_accepted = accepted
        if not self.loop.is_closed:
            self.loop.call_later(HEARTBEAT_INTERVAL, self._tick)

    def _trim_heap(self) -> None:
        """Give free heap pages back to the kernel (glibc only; a no-op elsewhere)."""
        if _malloc_trim is None:
            return
        began = time.monotonic()
        _malloc_trim(0)
        log.debug(
            "Heap trimmed in %.1f ms (%d connections open)",
            (time.monotonic() - began) * 1000,
            len(self.connections),
        )

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
        return self._stopping or self._draining

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (safe from any thread; values may be a moment apart)."""
        snap = self.stats_counters.snapshot()
        snap["pool_in_use"] = self.pool.in_use
        snap["pool_capacity"] = self.pool.capacity
        return snap

    def heartbeat_age(self) -> float | None:
        """Seconds since the loop last finished waiting in select (any thread); None while the loop
        is not running. An idle loop wakes every :data:`HEARTBEAT_INTERVAL`, so a large age means
        a handler or callback is blocking the loop thread."""
        if not self.loop.is_running:
            return None
        return max(0.0, time.monotonic() - self.loop.heartbeat)

    def metrics_snapshot(self) -> MetricsSnapshot:
        """Everything /metrics shows, read from any thread without stopping the loop.

        Bytes per instance are those of closed connections (added on the loop thread at close)
        plus a read of the live counters of the connections still open (one attribute read per
        open connection per scrape). The two reads are not atomic together: a connection that
        closes in between is missed for one scrape, so the reported values are clamped to never go
        below what was reported before (Prometheus counters must not decrease).
        """
        stats = self.stats_counters
        instances = instance_snapshots(stats, self._live_bytes)
        with self._bytes_lock:
            seen = self._bytes_seen
            for name, snap in list(instances.items()):
                up0, down0 = seen.get(name, (0, 0))
                up, down = max(up0, snap.bytes_up), max(down0, snap.bytes_down)
                seen[name] = (up, down)
                if (up, down) != (snap.bytes_up, snap.bytes_down):
                    instances[name] = dataclasses.replace(snap, bytes_up=up, bytes_down=down)
        return MetricsSnapshot(
            worker=self.worker_index,
            active=stats.active,
            closed_ok=stats.closed_ok,
            closed_error=stats.closed_error,
            refused=stats.refused(),
            instances=instances,
            loop_latency=self.loop.iteration_latency.snapshot(),
            heartbeat_age=self.heartbeat_age(),
            pool_in_use=self.pool.in_use,
            pool_capacity=self.pool.capacity,
        )

    def _live_bytes(self) -> dict[str, tuple[int, int]]:
        """(bytes up, bytes down) of open connections per instance; any thread."""
        conns: list[Connection] = []
        for _ in range(3):
            try:
                conns = list(self.connections)  # one C-level copy under the GIL
                break
            except RuntimeError:  # changed size during the copy (not expected under the GIL)
                continue
        totals: dict[str, tuple[int, int]] = {}
        closed = State.CLOSED
        for conn in conns:
            if conn.state is closed:  # being (or already) added to the closed totals
                continue
            name = conn.counters.name
            up, down = totals.get(name, (0, 0))
            totals[name] = (up + conn.bytes_up, down + conn.bytes_down)
        return totals


def _open_reserve() -> int:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1
