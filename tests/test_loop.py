"""The selectors loop: timers, callbacks, cross-thread wake-up, dispatch, interest caching.

Nothing here sleeps to wait: threads report through ``threading.Event`` with generous timeouts,
and timer tests drive ``run_once``, which blocks in ``select`` exactly until the next timer.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fastproxy.loop import COMPACT_MIN_CANCELLED, Loop, raise_nofile_limit

WAIT_S = 10.0  # generous: only a broken wake-up ever waits this long


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def run_until(loop: Loop, done: Callable[[], bool], limit_s: float = WAIT_S) -> None:
    """Drive ``run_once`` until ``done()``; bounded by a deadline (never an endless loop)."""
    deadline = time.monotonic() + limit_s
    while not done():
        left = deadline - time.monotonic()
        assert left > 0, "condition not reached in time"
        loop.run_once(timeout=left)


class Recorder:
    """A handler that records its calls and optionally runs hooks."""

    def __init__(
        self,
        sock: socket.socket | None = None,
        on_read: Callable[[], None] | None = None,
        on_write: Callable[[], None] | None = None,
    ) -> None:
        self.sock = sock
        self.calls: list[str] = []
        self._on_read = on_read
        self._on_write = on_write
        self.buf = bytearray(4096)

    def on_readable(self) -> None:
        self.calls.append("r")
        if self._on_read is not None:
            self._on_read()
        elif self.sock is not None:
            with contextlib.suppress(BlockingIOError):
                self.sock.recv_into(self.buf)

    def on_writable(self) -> None:
        self.calls.append("w")
        if self._on_write is not None:
            self._on_write()


# -- timers --------------------------------------------------------------------------------------
def test_timers_fire_in_order(loop: Loop) -> None:
    fired: list[str] = []
    loop.call_later(0.03, fired.append, "c")
    loop.call_later(0.01, fired.append, "a")
    loop.call_later(0.02, fired.append, "b")
    when = loop.time() + 0.015
    for tag in ("x1", "x2", "x3"):  # same deadline: FIFO
        loop.call_at(when, fired.append, tag)
    run_until(loop, lambda: len(fired) == 6)
    assert fired == ["a", "x1", "x2", "x3", "b", "c"]


def test_timer_does_not_fire_early(loop: Loop) -> None:
    fired: list[float] = []
    start = loop.time()
    loop.call_later(0.05, lambda: fired.append(loop.time()))
    run_until(loop, lambda: bool(fired))
    assert fired[0] - start >= 0.05 - 1e-6  # never early (beyond clock resolution)


def test_cancel(loop: Loop) -> None:
    fired: list[str] = []
    h1 = loop.call_later(0.01, fired.append, "cancelled")
    loop.call_later(0.02, fired.append, "kept")
    h1.cancel()
    h1.cancel()  # idempotent
    assert h1.cancelled()
    run_until(loop, lambda: bool(fired))
    assert fired == ["kept"]
    assert loop.timer_count == 0
    assert loop.cancelled_timer_count == 0


def test_cancel_after_fire_is_harmless(loop: Loop) -> None:
    fired: list[int] = []
    h = loop.call_later(0, fired.append, 1)
    run_until(loop, lambda: bool(fired))
    h.cancel()
    assert loop.cancelled_timer_count == 0


def test_timer_cancelled_by_earlier_timer_in_same_batch(loop: Loop) -> None:
    fired: list[str] = []
    when = loop.time()
    loop.call_at(when, lambda: h2.cancel())
    h2 = loop.call_at(when, fired.append, "should not run")
    loop.call_at(when, fired.append, "runs")
    run_until(loop, lambda: bool(fired))
    assert fired == ["runs"]
    assert loop.cancelled_timer_count == 0


def test_cancel_drops_callback_reference(loop: Loop) -> None:
    class Big:
        pass

    obj = Big()
    h = loop.call_later(3600, lambda o: None, obj)
    h.cancel()
    assert obj not in h._args  # a cancelled deadline keeps nothing alive


def test_heap_compaction(loop: Loop) -> None:
    n = 4 * COMPACT_MIN_CANCELLED
    handles = [loop.call_later(3600 + i, lambda: None) for i in range(n)]
    assert loop.timer_count == n
    # Cancel three quarters: compaction must have kicked in once cancelled entries dominated.
    for h in handles[: 3 * n // 4]:
        h.cancel()
    assert loop.timer_count < n
    live = [e for e in loop._timers if not e[2].cancelled()]
    assert len(live) == n // 4
    assert loop.cancelled_timer_count == loop.timer_count - len(live)
    assert loop.cancelled_timer_count <= COMPACT_MIN_CANCELLED + 1


def test_compaction_keeps_heap_valid(loop: Loop) -> None:
    fired: list[int] = []
    base = loop.time()
    handles = [loop.call_at(base + (i % 7) * 0.001, fired.append, i) for i in range(500)]
    for h in handles[::3] + handles[1::3]:
        h.cancel()
    expected = sorted(range(2, 500, 3), key=lambda i: ((i % 7), i))
    run_until(loop, lambda: len(fired) == len(expected))
    assert fired == expected
    assert loop.timer_count == 0


def test_select_timeout(loop: Loop) -> None:
    assert loop._select_timeout() is None  # nothing scheduled: block
    h = loop.call_later(10, lambda: None)
    t = loop._select_timeout()
    assert t is not None and 9 < t <= 10
    h.cancel()
    assert loop._select_timeout() is None  # the cancelled head is dropped
    loop.call_soon(lambda: None)
    assert loop._select_timeout() == 0.0


def test_run_once_with_timeout_returns_when_idle(loop: Loop) -> None:
    t0 = time.monotonic()
    assert loop.run_once(timeout=0.0) == 0
    assert time.monotonic() - t0 < 1.0


# -- callbacks -----------------------------------------------------------------------------------
def test_call_soon_order_and_no_starvation(loop: Loop) -> None:
    seen: list[Any] = []

    def again() -> None:
        seen.append("again")
        loop.call_soon(again)  # re-arms forever: must not run twice in one iteration

    loop.call_soon(seen.append, 1)
    loop.call_soon(seen.append, 2)
    loop.call_soon(again)
    assert loop.run_once(timeout=0) == 3
    assert seen == [1, 2, "again"]
    loop.run_once(timeout=0)
    assert seen == [1, 2, "again", "again"]


class SelectEntered(selectors.DefaultSelector):
    """Signals when select() is about to block, so a test can call in while it really waits."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.timeouts: list[float | None] = []

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self.timeouts.append(timeout)
        self.entered.set()
        return list(super().select(timeout))


def test_call_soon_threadsafe_wakes_blocked_select() -> None:
    sel = SelectEntered()
    loop = Loop(selector=sel)
    woke = threading.Event()
    returned = threading.Event()

    def loop_thread() -> None:
        loop.run_once()  # nothing scheduled: blocks until woken
        returned.set()

    t = threading.Thread(target=loop_thread, daemon=True)
    try:
        t.start()
        assert sel.entered.wait(WAIT_S)
        assert sel.timeouts == [None]  # it really blocks: no timer, no callback
        t0 = time.monotonic()
        assert loop.call_soon_threadsafe(woke.set)
        assert returned.wait(WAIT_S), "select was not woken"
        assert time.monotonic() - t0 < 2.0
        t.join(WAIT_S)
        if not woke.is_set():  # the doorbell and the call were seen in different iterations
            loop.run_once(timeout=0)
        assert woke.is_set()
    finally:
        if t.is_alive():
            loop.stop()
            t.join(WAIT_S)
        loop.close()


def test_call_soon_threadsafe_while_running_and_stop_from_thread(loop: Loop) -> None:
    ran = threading.Event()
    results: list[str] = []
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    for i in range(100):
        assert loop.call_soon_threadsafe(results.append, str(i))
    loop.call_soon_threadsafe(ran.set)
    assert ran.wait(WAIT_S)
    assert results == [str(i) for i in range(100)]
    loop.stop()  # from this (non-loop) thread
    t.join(WAIT_S)
    assert not t.is_alive()
    assert not loop.is_running


def test_many_threads_call_in(loop: Loop) -> None:
    counter: list[int] = []
    done = threading.Event()
    n_threads, per_thread = 4, 500

    def work() -> None:
        for _ in range(per_thread):
            loop.call_soon_threadsafe(counter.append, 1)

    def check() -> None:
        if len(counter) == n_threads * per_thread:
            done.set()
            loop.stop()
        else:
            loop.call_later(0.001, check)

    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()
    workers = [threading.Thread(target=work) for _ in range(n_threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(WAIT_S)
    loop.call_soon_threadsafe(check)
    assert done.wait(WAIT_S)
    runner.join(WAIT_S)
    assert not runner.is_alive()


def test_stop_from_callback_and_rerun(loop: Loop) -> None:
    loop.call_soon(loop.stop)
    loop.run()
    assert not loop.is_running
    seen: list[int] = []
    loop.call_soon(seen.append, 1)
    loop.call_soon(loop.stop)
    loop.run()  # runnable again after a stop
    assert seen == [1]


def test_stop_before_run_returns_at_once(loop: Loop) -> None:
    loop.stop()
    loop.run()
    assert not loop.is_running


def test_wakeup_socket_full_is_ignored(loop: Loop) -> None:
    # Far more wake-ups than the socket buffer holds: none may raise, all calls run.
    seen: list[int] = []
    for i in range(20_000):
        loop.call_soon_threadsafe(seen.append, i)
    run_until(loop, lambda: len(seen) == 20_000)
    assert seen[-1] == 19_999
    loop.run_once(timeout=0)  # the drained doorbell leaves nothing readable behind
    assert loop.run_once(timeout=0) == 0


# -- errors --------------------------------------------------------------------------------------
def test_exceptions_are_logged_and_the_loop_goes_on(
    loop: Loop, pair: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair

    def boom() -> None:
        raise RuntimeError("handler bug")

    h = Recorder(on_read=boom)
    loop.register(a, h, True, False)
    b.send(b"x")
    after: list[str] = []
    loop.call_soon(lambda: 1 / 0)
    loop.call_soon(after.append, "callback after the failing one")
    loop.call_later(0, lambda: [][1])
    with caplog.at_level(logging.ERROR, logger="fastproxy.loop"):
        loop.run_once(timeout=WAIT_S)
        run_until(loop, lambda: bool(after))
    assert h.calls[:1] == ["r"]
    assert after == ["callback after the failing one"]
    errors = [r for r in caplog.records if r.name == "fastproxy.loop"]
    kinds = {r.exc_info[0] for r in errors if r.exc_info}
    assert {RuntimeError, ZeroDivisionError, IndexError} <= kinds
    assert all(r.levelno == logging.ERROR for r in errors)
    loop.unregister(a)


def test_keyboard_interrupt_propagates(loop: Loop) -> None:
    def interrupt() -> None:
        raise KeyboardInterrupt

    loop.call_soon(interrupt)
    with pytest.raises(KeyboardInterrupt):
        loop.run_once(timeout=0)


# -- registration and dispatch -------------------------------------------------------------------
def test_readable_and_writable_dispatch(
    loop: Loop, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    h = Recorder(a)
    fd = loop.register(a, h, False, True)
    assert fd == a.fileno()
    loop.run_once(timeout=WAIT_S)
    assert h.calls == ["w"]  # an empty socket buffer: writable at once
    loop.modify(fd, True, False)
    assert loop.run_once(timeout=0) == 0  # nothing to read yet
    b.send(b"hello")
    loop.run_once(timeout=WAIT_S)
    assert h.calls == ["w", "r"]
    assert bytes(h.buf[:5]) == b"hello"
    loop.unregister(fd)
    b.send(b"more")
    assert loop.run_once(timeout=0) == 0
    assert not loop.is_registered(fd)


def test_zero_interest_registration(loop: Loop, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    h = Recorder(a)
    loop.register(a, h, False, False)
    b.send(b"x")
    assert loop.run_once(timeout=0) == 0
    assert loop.interest(a.fileno()) == (False, False)
    loop.modify(a.fileno(), True, False)
    loop.run_once(timeout=WAIT_S)
    assert h.calls == ["r"]
    loop.modify(a.fileno(), False, False)
    b.send(b"y")
    assert loop.run_once(timeout=0) == 0
    loop.unregister(a.fileno())  # unregistering an unwatched fd works too


def test_register_twice_and_unknown_fd(
    loop: Loop, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, _ = pair
    loop.register(a, Recorder(), True, False)
    with pytest.raises(KeyError):
        loop.register(a.fileno(), Recorder(), True, False)
    loop.unregister(a)
    with pytest.raises(KeyError):
        loop.unregister(a)
    with pytest.raises(KeyError):
        loop.modify(a.fileno(), True, True)


class SpySelector(selectors.DefaultSelector):
    """Counts the calls that reach the selector (i.e. epoll_ctl)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        self.calls.append(("register", events))
        return super().register(fileobj, events, data)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        self.calls.append(("modify", events))
        return super().modify(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        self.calls.append(("unregister", 0))
        return super().unregister(fileobj)


def test_modify_skips_selector_when_unchanged(pair: tuple[socket.socket, socket.socket]) -> None:
    spy = SpySelector()
    loop = Loop(selector=spy)
    try:
        a, b = pair
        h = Recorder(a)
        fd = loop.register(a, h, True, False)
        spy.calls.clear()
        for _ in range(100):
            loop.modify(fd, True, False)
        assert spy.calls == []
        loop.modify(fd, True, True)
        loop.modify(fd, True, True)
        assert spy.calls == [("modify", selectors.EVENT_READ | selectors.EVENT_WRITE)]
        loop.modify(fd, False, False)
        loop.modify(fd, False, False)
        loop.modify(fd, True, False)
        assert spy.calls[1:] == [("unregister", 0), ("register", selectors.EVENT_READ)]
        # The handler survived every change (selectors.modify replaces key data).
        b.send(b"x")
        loop.run_once(timeout=WAIT_S)
        assert h.calls == ["r"]
        assert loop.interest(fd) == (True, False)
    finally:
        loop.close()


def test_event_for_fd_unregistered_earlier_in_batch_is_dropped(loop: Loop) -> None:
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    try:
        def drop_other() -> None:
            for fd in (a1.fileno(), a2.fileno()):
                if loop.is_registered(fd):
                    loop.unregister(fd)

        h1 = Recorder(on_read=drop_other)
        # Both handlers unregister both fds; whichever runs first, the other must not run.
        h2 = Recorder(on_read=drop_other)
        loop.register(a1, h1, True, False)
        loop.register(a2, h2, True, False)
        b1.send(b"x")
        b2.send(b"x")
        # Wait until both are ready so that they arrive in one batch.
        sel = selectors.DefaultSelector()
        sel.register(a1, selectors.EVENT_READ)
        sel.register(a2, selectors.EVENT_READ)
        deadline = time.monotonic() + WAIT_S
        while len(sel.select(0.1)) < 2:
            assert time.monotonic() < deadline
        sel.close()
        loop.run_once(timeout=WAIT_S)
        assert len(h1.calls) + len(h2.calls) == 1
    finally:
        for s in (a1, b1, a2, b2):
            s.close()


def test_writable_dropped_when_read_handler_turns_write_off(
    loop: Loop, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    fd = a.fileno()
    h = Recorder(a, on_read=lambda: loop.modify(fd, True, False))
    loop.register(a, h, True, True)
    b.send(b"x")
    loop.run_once(timeout=WAIT_S)
    assert h.calls == ["r"]


def test_readable_then_writable_in_one_event(
    loop: Loop, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    h = Recorder(a)
    loop.register(a, h, True, True)
    b.send(b"x")
    loop.run_once(timeout=WAIT_S)
    assert h.calls == ["r", "w"]


def test_close_is_idempotent_and_final(pair: tuple[socket.socket, socket.socket]) -> None:
    loop = Loop()
    a, _ = pair
    loop.register(a, Recorder(), True, False)
    loop.close()
    loop.close()
    assert loop.is_closed
    assert loop.call_soon_threadsafe(lambda: None) is False
    loop.stop()  # harmless
    with pytest.raises(RuntimeError):
        loop.run_once(timeout=0)
    with pytest.raises(RuntimeError):
        loop.run()
    # The caller's socket is untouched by close().
    assert a.fileno() >= 0


def test_registered_count(loop: Loop, pair: tuple[socket.socket, socket.socket]) -> None:
    assert loop.registered_count == 0
    loop.register(pair[0], Recorder(), True, False)
    assert loop.registered_count == 1


def test_context_manager() -> None:
    with Loop() as lp:
        lp.call_soon(lambda: None)
        assert lp.run_once(timeout=0) == 1
    assert lp.is_closed


# -- resources -----------------------------------------------------------------------------------
def test_raise_nofile_limit() -> None:
    soft0, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        lowered = min(soft0, 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        soft, hard_after = raise_nofile_limit()
        assert hard_after == hard
        if hard != resource.RLIM_INFINITY:
            assert soft == hard
        else:
            assert soft > lowered
        assert (soft, hard_after) == resource.getrlimit(resource.RLIMIT_NOFILE)
        assert raise_nofile_limit() == (soft, hard_after)  # idempotent
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft0, hard))
