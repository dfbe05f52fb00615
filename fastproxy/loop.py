"""The event loop: one thread, epoll (or any ``selectors`` selector), timers, a call queue.

The loop knows file descriptors and time, nothing else: no TLS, no protocol, no buffers. Everything
it owns (the selector, the timer heap, the ready queue, the registrations) is touched only by the
thread that runs it. There is exactly one way in from another thread:
:meth:`Loop.call_soon_threadsafe` (and :meth:`Loop.stop`, which uses the same wake-up).

Registration and interest
=========================
On Linux the loop drives an ``epoll`` object itself (``select.epoll``); elsewhere, or when a
``selectors`` selector is passed in (tests do, to spy on it), it goes through that selector.
Profiling the 64-connection ping-pong showed ``selectors.EpollSelector.select`` building a
``(key, events)`` tuple per event (a method call and a dict lookup each) only for the loop to look
the fd up again in its own table; polling epoll directly leaves one lookup per event
(``perf/bench_loop.py``, medians on the 2-core build machine: one iteration with 1 ready socket
4.4 -> 3.7 us, with 1,000 ready 2.7 -> 2.2 ms). Either way the loop's own table,
fd -> ``_Registration(handler, mask)``, is what dispatch uses: ``regs[fd].handler.on_readable()``.

The loop caches the current interest mask of each fd. :meth:`Loop.modify` returns at once when the
mask does not change, so callers may state their wanted interest after every event without paying
an ``epoll_ctl`` each time (the design's "keep out: re-registering selector interest every tick").
Interest "nothing" (neither read nor write) is allowed: ``selectors`` refuses a zero mask, so such
an fd is kept in the loop's table but removed from the epoll set, and re-added when interest
returns.

Events are masked with the interest in effect when they are dispatched: an error or hang-up
(``EPOLLERR``/``EPOLLHUP``) counts as both readable and writable, as in ``selectors``. Events for
an fd that was unregistered (or unregistered and reused by a new registration) earlier in the same
batch are dropped; a writable event is dropped when the readable handler that ran just before it
turned write interest off. Spurious events are still possible in general (level-triggered
readiness can be stale by the time the handler runs), so handlers use non-blocking sockets and treat
``BlockingIOError`` as "not yet".

Timers
======
A binary heap of ``(when, seq, handle)`` tuples on :func:`time.monotonic` (tuples compare in C;
``seq`` breaks ties FIFO and keeps handles from ever being compared). Cancelling is lazy: the handle
is marked and dropped when it reaches the top. Connection deadlines are set and cancelled constantly
(every connection that completes its handshake cancels one), so cancelled entries would otherwise
pile up; once they are more than half the heap (and more than :data:`COMPACT_MIN_CANCELLED`) the
heap is rebuilt without them in O(n) -- the same policy as CPython's asyncio.

Cross-thread calls and the wake-up
==================================
Other threads (the refresher, DNS workers, the health server, signal handlers) must not touch the
loop's state. :meth:`Loop.call_soon_threadsafe` appends ``(fn, args)`` to a
:class:`collections.deque` -- ``append`` and ``popleft`` are atomic under the GIL, so no lock is
needed and the loop thread never waits for one -- and then writes one byte to a non-blocking
socketpair whose read end is registered in the selector. The byte is only a doorbell: the deque
holds the work. It exists because the loop may be blocked in ``epoll_wait`` with no timer due, and
a deque append alone would not wake it until the next unrelated event. If the socket buffer is full
a wake-up is already pending, so ``BlockingIOError`` is ignored; the loop drains the whole socket
(``recv_into`` a preallocated buffer) when woken. A socketpair rather than an ``eventfd`` keeps it
portable and lets the same code serve any ``selectors`` backend (trio and asyncio do the same).
Appending *before* writing the byte closes the race with a loop that has just found the queue empty
and is about to block: the byte makes that select return.

One iteration (:meth:`Loop.run_once`)
=====================================
1. Select timeout: 0 if callbacks are ready, else the time to the earliest live timer, else block.
2. Dispatch I/O events: ``on_readable`` then ``on_writable``.
3. Run the timers that are due (collected first, so a timer that re-arms itself with delay 0 runs
   next iteration, not in an endless loop now).
4. Run the callbacks that were ready when the step began (same reason: a callback that calls
   :meth:`Loop.call_soon` again cannot starve I/O).

An exception from a handler or a callback is a bug in that code, not a reason to stop serving every
other connection: it is logged with its traceback at ERROR on ``fastproxy.loop`` and the loop goes
on. ``KeyboardInterrupt`` and ``SystemExit`` are not caught.

Heartbeat and iteration latency
===============================
When select returns, the loop stores :func:`time.monotonic` in :attr:`Loop.heartbeat` (a float
attribute: other threads read it without a lock) and, at the end of the iteration, records how
long the iteration was busy in :attr:`Loop.iteration_latency` (a fixed-bucket int histogram, see
:mod:`fastproxy.stats`). A health checker compares the heartbeat with the clock: a handler that
blocks stops it. An idle loop blocks in select indefinitely, so whoever checks the heartbeat must
also keep a periodic timer on the loop (``Proxy`` installs a 1 s one).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import resource
import select
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeAlias

from fastproxy.stats import LOOP_BUCKETS, Histogram

__all__ = [
    "COMPACT_MIN_CANCELLED",
    "FileLike",
    "Handler",
    "HasFileno",
    "Loop",
    "TimerHandle",
    "raise_nofile_limit",
]

log = logging.getLogger("fastproxy.loop")

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
# What dispatch works with: epoll's event bits (the selectors fallback is translated to them).
_EPOLLIN = getattr(select, "EPOLLIN", 0x001)
_EPOLLOUT = getattr(select, "EPOLLOUT", 0x004)
_NOT_OUT = ~_EPOLLOUT  # readable: IN, or ERR/HUP
_NOT_IN = ~_EPOLLIN  # writable: OUT, or ERR/HUP
#: Loop interest mask (EVENT_READ | EVENT_WRITE) -> epoll event bits.
_TO_EPOLL = (0, _EPOLLIN, _EPOLLOUT, _EPOLLIN | _EPOLLOUT)
_monotonic = time.monotonic

#: Compact the timer heap only when more than this many cancelled entries are in it (and they are
#: more than half of it): below that, rebuilding costs more than popping them lazily.
COMPACT_MIN_CANCELLED = 100

#: Size of the buffer the wake-up socket is drained into. One recv usually empties it.
_WAKE_DRAIN_SIZE = 4096

#: Soft RLIMIT_NOFILE to ask for when the hard limit is "unlimited" (Linux's default fs.nr_open).
_NOFILE_WHEN_UNLIMITED = 1 << 20


class Handler(Protocol):
    """What the loop dispatches to: one object per registered fd.

    Called on the loop thread when the fd is readable / writable (or has an error or hang-up, which
    ``selectors`` reports as both). Must not block. Exceptions are logged, not propagated.
    """

    def on_readable(self) -> None: ...

    def on_writable(self) -> None: ...


class HasFileno(Protocol):
    """Anything with a ``fileno()`` (a socket, a file)."""

    def fileno(self) -> int: ...


FileLike: TypeAlias = int | HasFileno


def _fileno(obj: FileLike) -> int:
    if isinstance(obj, int):
        return obj
    fd = obj.fileno()
    if fd < 0:
        raise ValueError(f"{obj!r} is closed (fileno {fd})")
    return fd


def _noop() -> None:
    pass


class TimerHandle:
    """A scheduled call; :meth:`cancel` it to drop it. Loop thread only.

    Holds no reference to the callback once cancelled, so a cancelled deadline does not keep a
    closed connection alive until the heap gets round to dropping the entry.
    """

    __slots__ = ("_args", "_cancelled", "_fn", "_loop", "_scheduled", "when")

    def __init__(
        self, when: float, fn: Callable[..., object], args: tuple[Any, ...], loop: Loop
    ) -> None:
        self.when = when
        self._fn = fn
        self._args = args
        self._loop = loop
        self._cancelled = False
        self._scheduled = True  # in the heap (False once popped, fired or compacted away)

    def cancel(self) -> None:
        """Cancel the call if it has not run yet; idempotent; harmless after it ran."""
        if self._cancelled:
            return
        self._cancelled = True
        self._fn = _noop
        self._args = ()
        if self._scheduled:
            self._loop._timer_cancelled()

    def cancelled(self) -> bool:
        return self._cancelled

    def __repr__(self) -> str:
        state = "cancelled" if self._cancelled else "pending" if self._scheduled else "done"
        return f"<TimerHandle when={self.when:.6f} {state} {self._fn!r}>"


class _Registration:
    """The loop's own record of one fd: the handler and the interest mask currently in effect."""

    __slots__ = ("handler", "mask")

    def __init__(self, handler: Handler, mask: int) -> None:
        self.handler = handler
        self.mask = mask


class _Waker:
    """Read end of the wake-up socketpair: drains the doorbell bytes. The work is in the deque."""

    __slots__ = ("_buf", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray(_WAKE_DRAIN_SIZE)

    def on_readable(self) -> None:
        sock, buf = self._sock, self._buf
        while True:
            try:
                if sock.recv_into(buf) < _WAKE_DRAIN_SIZE:
                    return
            except (BlockingIOError, InterruptedError):
                return

    def on_writable(self) -> None:  # never registered for writing
        pass


class Loop:
    """A single-threaded selectors loop with a timer heap and a thread-safe call queue."""

    def __init__(self, selector: selectors.BaseSelector | None = None) -> None:
        # Exactly one of the two: our own epoll (Linux, the default), or a selectors selector.
        self._epoll: Any = None
        self._selector: selectors.BaseSelector | None = None
        if selector is None and hasattr(select, "epoll"):
            self._epoll = select.epoll()
        else:
            self._selector = selector if selector is not None else selectors.DefaultSelector()
        self._regs: dict[int, _Registration] = {}
        # fds unregistered while a batch of events is being dispatched: their remaining events in
        # that batch are stale (the fd number may already belong to a new registration).
        self._dispatching = False
        self._stale: set[int] = set()
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._timer_seq = itertools.count()
        self._cancelled_timers = 0
        # One deque for call_soon and call_soon_threadsafe: append/popleft are atomic.
        self._ready: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._stopping = False
        self._running = False
        self._closed = False
        self._clock_resolution = time.get_clock_info("monotonic").resolution
        #: monotonic time the last iteration's select returned (any thread may read it)
        self.heartbeat = _monotonic()
        #: busy time of each iteration (select return to end of iteration); loop thread writes
        self.iteration_latency = Histogram(LOOP_BUCKETS)
        rsock, wsock = socket.socketpair()
        rsock.setblocking(False)
        wsock.setblocking(False)
        self._wake_r = rsock
        self._wake_w = wsock
        self._wake_fd = rsock.fileno()
        self.register(rsock, _Waker(rsock), True, False)

    # ------------------------------------------------------------------------------------------
    # registration
    def register(self, fileobj: FileLike, handler: Handler, read: bool, write: bool) -> int:
        """Watch ``fileobj`` (a socket or an fd) for the given interest; returns the fd.

        ``read=write=False`` is allowed (the fd is known but not watched until :meth:`modify`).
        Unregister before closing the socket: a closed fd number is reused by the next socket.
        Raises ``KeyError`` if the fd is already registered.
        """
        fd = _fileno(fileobj)
        if fd in self._regs:
            raise KeyError(f"fd {fd} is already registered")
        mask = (_READ if read else 0) | (_WRITE if write else 0)
        if mask:
            self._watch(fd, mask, handler)
        self._regs[fd] = _Registration(handler, mask)
        return fd

    def _watch(self, fd: int, mask: int, handler: Handler) -> None:
        if self._epoll is not None:
            self._epoll.register(fd, _TO_EPOLL[mask])
        else:
            assert self._selector is not None
            self._selector.register(fd, mask, handler)

    def _unwatch(self, fd: int) -> None:
        if self._epoll is not None:
            self._epoll.unregister(fd)
        else:
            assert self._selector is not None
            self._selector.unregister(fd)

    def modify(self, fd: FileLike, read: bool, write: bool) -> None:
        """Set the interest of a registered fd; a no-op (no syscall) when it does not change."""
        if not isinstance(fd, int):
            fd = _fileno(fd)
        reg = self._regs[fd]  # KeyError: not registered
        mask = (_READ if read else 0) | (_WRITE if write else 0)
        old = reg.mask
        if mask == old:
            return
        if not old:
            self._watch(fd, mask, reg.handler)
        elif not mask:
            self._unwatch(fd)
        elif self._epoll is not None:
            self._epoll.modify(fd, _TO_EPOLL[mask])
        else:
            assert self._selector is not None
            # Pass the handler again: selectors.modify() replaces the key's data with its argument.
            self._selector.modify(fd, mask, reg.handler)
        reg.mask = mask

    def unregister(self, fd: FileLike) -> None:
        """Stop watching an fd (call before closing it). Raises ``KeyError`` if not registered."""
        if not isinstance(fd, int):
            fd = _fileno(fd)
        if fd == self._wake_fd and not self._closed:
            raise ValueError("the wake-up socket belongs to the loop")
        reg = self._regs.pop(fd)
        if reg.mask:
            self._unwatch(fd)
        if self._dispatching:
            self._stale.add(fd)

    def is_registered(self, fd: int) -> bool:
        return fd in self._regs

    def interest(self, fd: int) -> tuple[bool, bool]:
        """The cached ``(read, write)`` interest of a registered fd."""
        mask = self._regs[fd].mask
        return bool(mask & _READ), bool(mask & _WRITE)

    @property
    def registered_count(self) -> int:
        """Registered fds, not counting the loop's own wake-up socket."""
        return len(self._regs) - (0 if self._closed else 1)

    # ------------------------------------------------------------------------------------------
    # time and timers
    @staticmethod
    def time() -> float:
        """The loop's clock: :func:`time.monotonic` (never jumps with the wall clock)."""
        return _monotonic()

    def call_later(self, delay: float, fn: Callable[..., object], *args: Any) -> TimerHandle:
        """Call ``fn(*args)`` on the loop thread after ``delay`` seconds. Loop thread only."""
        return self.call_at(_monotonic() + delay, fn, *args)

    def call_at(self, when: float, fn: Callable[..., object], *args: Any) -> TimerHandle:
        """Call ``fn(*args)`` at loop time ``when`` (see :meth:`time`). Loop thread only."""
        handle = TimerHandle(when, fn, args, self)
        heapq.heappush(self._timers, (when, next(self._timer_seq), handle))
        return handle

    def _timer_cancelled(self) -> None:
        self._cancelled_timers += 1
        if self._cancelled_timers > COMPACT_MIN_CANCELLED and self._cancelled_timers * 2 > len(
            self._timers
        ):
            self._compact_timers()

    def _compact_timers(self) -> None:
        """Rebuild the heap without cancelled entries, in place (O(n))."""
        timers = self._timers
        timers[:] = [entry for entry in timers if not entry[2]._cancelled]
        heapq.heapify(timers)
        self._cancelled_timers = 0

    @property
    def timer_count(self) -> int:
        """Entries in the timer heap, cancelled ones not yet dropped included."""
        return len(self._timers)

    @property
    def cancelled_timer_count(self) -> int:
        return self._cancelled_timers

    # ------------------------------------------------------------------------------------------
    # callbacks
    def call_soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Call ``fn(*args)`` on the loop thread in the next iteration. Loop thread only.

        (From another thread it would be queued but might not wake a blocked select; use
        :meth:`call_soon_threadsafe` there.)
        """
        self._ready.append((fn, args))

    def call_soon_threadsafe(self, fn: Callable[..., object], *args: Any) -> bool:
        """Call ``fn(*args)`` on the loop thread soon, from any thread; wakes a blocked select.

        Returns False (and drops the call) if the loop is already closed: nothing will ever run
        it, and callers shutting down concurrently with the loop should not have to catch an
        exception for that.
        """
        if self._closed:
            return False
        self._ready.append((fn, args))
        self._wake()
        return True

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # the buffer is full: a wake-up is pending already
        except OSError:
            pass  # closed concurrently by close(): the loop is gone

    # ------------------------------------------------------------------------------------------
    # running
    def run(self) -> None:
        """Run iterations until :meth:`stop` (a stop() before run() makes it return at once)."""
        if self._running:
            raise RuntimeError("the loop is already running")
        if self._closed:
            raise RuntimeError("the loop is closed")
        self._running = True
        self.heartbeat = _monotonic()
        try:
            while not self._stopping:
                self.run_once()
        finally:
            self._stopping = False
            self._running = False

    def stop(self) -> None:
        """Make :meth:`run` return after the current iteration. Any thread; idempotent."""
        self._stopping = True
        if not self._closed:
            self._wake()

    @property
    def is_running(self) -> bool:
        return self._running

    @property
    def is_closed(self) -> bool:
        return self._closed

    def _select_timeout(self) -> float | None:
        if self._ready:
            return 0.0
        timers = self._timers
        while timers and timers[0][2]._cancelled:
            heapq.heappop(timers)[2]._scheduled = False
            self._cancelled_timers -= 1
        if timers:
            delay = timers[0][0] - _monotonic()
            return delay if delay > 0.0 else 0.0
        return None

    def run_once(self, timeout: float | None = None) -> int:
        """One iteration: select, dispatch I/O, fire due timers, run ready callbacks.

        ``timeout`` caps how long the select may block (None: as long as nothing is due).
        Returns how many I/O events, timers and callbacks were run (for tests and embedding).
        """
        if self._closed:
            raise RuntimeError("the loop is closed")
        wait = self._select_timeout()
        if timeout is not None and (wait is None or timeout < wait):
            wait = timeout if timeout > 0.0 else 0.0
        if self._epoll is not None:
            events: list[tuple[int, int]] = self._epoll.poll(wait)
        else:
            events = self._select(wait)
        self.heartbeat = began = _monotonic()
        done = len(events)

        if events:
            regs, stale = self._regs, self._stale
            self._dispatching = True
            try:
                for fd, ev in events:
                    reg = regs.get(fd)
                    if reg is None or (stale and fd in stale):
                        continue  # unregistered (maybe reused) by an earlier handler in this batch
                    if ev & _NOT_OUT and reg.mask & _READ:
                        try:
                            reg.handler.on_readable()
                        except Exception:
                            log.exception(
                                "unhandled exception in %r.on_readable (fd %d)", reg.handler, fd
                            )
                        if not ev & _NOT_IN or not reg.mask & _WRITE or (stale and fd in stale):
                            continue
                    elif not (ev & _NOT_IN and reg.mask & _WRITE):
                        continue
                    try:
                        reg.handler.on_writable()
                    except Exception:
                        log.exception(
                            "unhandled exception in %r.on_writable (fd %d)", reg.handler, fd
                        )
            finally:
                self._dispatching = False
                if stale:
                    stale.clear()

        timers = self._timers
        if timers and timers[0][0] <= _monotonic() + self._clock_resolution:
            done += self._run_due_timers()

        ready = self._ready
        if ready:
            n = len(ready)
            done += n
            popleft = ready.popleft
            for _ in range(n):
                fn, args = popleft()
                try:
                    fn(*args)
                except Exception:
                    log.exception("unhandled exception in callback %r", fn)
        self.iteration_latency.observe(_monotonic() - began)
        return done

    def _select(self, wait: float | None) -> list[tuple[int, int]]:
        """The ``selectors`` fallback, translated to ``(fd, epoll event bits)``."""
        assert self._selector is not None
        return [
            (key.fd, (_EPOLLIN if mask & _READ else 0) | (_EPOLLOUT if mask & _WRITE else 0))
            for key, mask in self._selector.select(wait)
        ]

    def _run_due_timers(self) -> int:
        timers = self._timers
        end = _monotonic() + self._clock_resolution
        due: list[TimerHandle] = []
        while timers and timers[0][0] <= end:
            handle = heapq.heappop(timers)[2]
            handle._scheduled = False
            if handle._cancelled:
                self._cancelled_timers -= 1
            else:
                due.append(handle)
        fired = 0
        for handle in due:
            if handle._cancelled:
                continue  # cancelled by a timer that fired before it in this batch
            fired += 1
            fn = handle._fn
            try:
                fn(*handle._args)
            except Exception:
                log.exception("unhandled exception in timer callback %r", fn)
        return fired

    # ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the selector and the wake-up sockets; idempotent. Not while running.

        Registered fds are forgotten, not closed: their owners close them.
        """
        if self._closed:
            return
        if self._running:
            raise RuntimeError("cannot close a running loop")
        self._closed = True
        if self._epoll is not None:
            self._epoll.close()
        else:
            assert self._selector is not None
            self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        self._regs.clear()
        for _, _, handle in self._timers:
            handle._scheduled = False
        self._timers.clear()
        self._cancelled_timers = 0
        self._ready.clear()

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return ``(soft, hard)`` afterwards.

    Every proxied connection costs two descriptors, and distributions default the soft limit to
    1024 while the hard limit is usually far higher. Raising the soft limit needs no privilege. If
    the hard limit is "unlimited" we ask for :data:`_NOFILE_WHEN_UNLIMITED` (the kernel refuses
    more than ``fs.nr_open``). Failure is not fatal: the limits stay as they were.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _NOFILE_WHEN_UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.debug("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)
