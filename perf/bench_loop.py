"""Cost of one loop iteration with N ready sockets (pytest-benchmark).

Run with ``pytest perf/`` or ``pytest perf/bench_loop.py``. Each round writes one byte into N
socketpairs (untimed setup), then times one ``run_once``: ``epoll_wait``, the dispatch to N
handlers, and each handler's ``recv_into`` of a preallocated buffer. Divide by N for the
per-event cost. ``idle_1000_one_ready`` shows that idle registrations cost nothing per iteration
(epoll reports only ready fds). Also: a no-op ``modify`` and a ``call_later`` + ``cancel`` pair,
both paid per connection event / per connection. At most ~2000 fds are open at once.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from fastproxy.loop import Loop, raise_nofile_limit


class Drain:
    """A handler that reads what is pending into one shared preallocated buffer."""

    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket, buf: memoryview) -> None:
        self.sock = sock
        self.buf = buf

    def on_readable(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.sock.recv_into(self.buf)

    def on_writable(self) -> None:
        pass


Pairs = list[tuple[socket.socket, socket.socket]]


@pytest.fixture
def loop() -> Iterator[Loop]:
    raise_nofile_limit()
    lp = Loop()
    yield lp
    lp.close()


def _pairs(loop: Loop, n: int) -> Pairs:
    buf = memoryview(bytearray(4096))
    pairs: Pairs = []
    for _ in range(n):
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        loop.register(a, Drain(a, buf), True, False)
        pairs.append((a, b))
    return pairs


def _close(loop: Loop, pairs: Pairs) -> None:
    for a, b in pairs:
        loop.unregister(a)
        a.close()
        b.close()


@pytest.mark.parametrize("n", [1, 100, 1000])
def test_run_once_n_ready(benchmark: BenchmarkFixture, loop: Loop, n: int) -> None:
    pairs = _pairs(loop, n)
    try:

        def fill() -> None:
            for _, b in pairs:
                b.send(b"x")

        def once() -> int:
            return loop.run_once(timeout=5.0)

        rounds = {1: 2000, 100: 300, 1000: 50}[n]
        result = benchmark.pedantic(  # type: ignore[no-untyped-call]
            once, setup=fill, rounds=rounds, iterations=1
        )
        assert result == n
    finally:
        _close(loop, pairs)


def test_run_once_idle_1000_one_ready(benchmark: BenchmarkFixture, loop: Loop) -> None:
    pairs = _pairs(loop, 1000)
    try:
        _, b = pairs[500]

        def once() -> int:
            b.send(b"x")
            return loop.run_once(timeout=5.0)

        assert benchmark(once) == 1
    finally:
        _close(loop, pairs)


def test_modify_unchanged(benchmark: BenchmarkFixture, loop: Loop) -> None:
    pairs = _pairs(loop, 1)
    try:
        fd = pairs[0][0].fileno()
        benchmark(loop.modify, fd, True, False)
    finally:
        _close(loop, pairs)


def test_call_later_cancel(benchmark: BenchmarkFixture, loop: Loop) -> None:
    def noop() -> None:
        pass

    def cycle() -> None:
        loop.call_later(30.0, noop).cancel()

    benchmark(cycle)
    assert loop.timer_count <= 2 * 100 + 2  # compaction keeps the heap bounded
