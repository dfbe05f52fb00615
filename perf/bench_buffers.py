"""Cost of the buffer pool and the send queue on the hot path (pytest-benchmark).

Run with ``pytest perf/`` or ``pytest perf/bench_buffers.py``. What each number is:

* ``borrow_give_back``: one pool round trip; allocates nothing (see tests/test_buffers.py).
* ``queue_push_consume_64k``: borrow a slab, queue 64 KiB, consume it all (the slab goes back):
  the bookkeeping the proxy pays per 64 KiB forwarded, without the syscalls.
* ``queue_flush_64k_socketpair``: the same through a real unix socketpair: push, the
  opportunistic ``send`` of the slab's memoryview, and the peer's ``recv_into``. Mostly kernel.
* ``queue_flush_gather``: eight 8 KiB ``bytes`` chunks (ciphertext-like) flushed with one
  ``sendmsg``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from fastproxy.buffers import BufferPool, SendQueue

SLAB = 64 * 1024


def test_borrow_give_back(benchmark: BenchmarkFixture) -> None:
    pool = BufferPool(slab_size=SLAB, slab_count=16)
    borrow, give_back = pool.borrow, pool.give_back

    def cycle() -> None:
        slab = borrow()
        assert slab is not None
        give_back(slab)

    benchmark(cycle)
    assert pool.in_use == 0


def test_queue_push_consume_64k(benchmark: BenchmarkFixture) -> None:
    pool = BufferPool(slab_size=SLAB, slab_count=16)
    queue = SendQueue(pool)

    def cycle() -> None:
        slab = pool.borrow()
        assert slab is not None
        slab.end = SLAB  # as if recv_into filled it
        queue.push_slab(slab)
        queue.consume(SLAB)

    benchmark(cycle)
    assert pool.in_use == 0 and not queue


@pytest.fixture
def wide_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    yield a, b
    a.close()
    b.close()


def _read_exactly(sock: socket.socket, view: memoryview, n: int) -> None:
    got = 0
    for _ in range(10_000):  # bounded; data is already in the kernel, one or two reads suffice
        try:
            got += sock.recv_into(view[got:n])
        except BlockingIOError:
            continue
        if got >= n:
            return
    raise AssertionError("peer did not receive the data")


def test_queue_flush_64k_socketpair(
    benchmark: BenchmarkFixture, wide_pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = wide_pair
    pool = BufferPool(slab_size=SLAB, slab_count=16)
    queue = SendQueue(pool)
    sink = memoryview(bytearray(SLAB))

    def cycle() -> None:
        slab = pool.borrow()
        assert slab is not None
        slab.end = SLAB
        queue.push_slab(slab)
        assert queue.flush_to(a)
        _read_exactly(b, sink, SLAB)

    benchmark(cycle)
    assert pool.in_use == 0


def test_queue_flush_gather(
    benchmark: BenchmarkFixture, wide_pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = wide_pair
    pool = BufferPool(slab_size=SLAB, slab_count=1)
    queue = SendQueue(pool)
    chunks = [bytes(8192) for _ in range(8)]
    sink = memoryview(bytearray(SLAB))

    def cycle() -> None:
        for c in chunks:
            queue.push_bytes(c)
        assert queue.flush_to(a)
        _read_exactly(b, sink, SLAB)

    benchmark(cycle)
