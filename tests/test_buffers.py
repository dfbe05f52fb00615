"""The buffer pool and the send queue: ownership, watermarks, the opportunistic write."""

from __future__ import annotations

import socket
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fastproxy.buffers import (
    BufferPool,
    DoubleReturnError,
    SendQueue,
    Slab,
    flush_to_socket,
)

KIB = 1024


def filled(pool: BufferPool, data: bytes) -> Slab:
    slab = pool.borrow()
    assert slab is not None
    slab.view[: len(data)] = data
    slab.commit(len(data))
    return slab


# -- pool ----------------------------------------------------------------------------------------
def test_borrow_and_give_back() -> None:
    pool = BufferPool(slab_size=4 * KIB, slab_count=4)
    assert pool.capacity == 4 and pool.in_use == 0 and pool.available == 4
    a = pool.borrow()
    b = pool.borrow()
    assert a is not None and b is not None and a is not b
    assert len(a.view) == 4 * KIB and a.is_empty and a.free_space() == 4 * KIB
    assert pool.in_use == 2 and pool.high_water == 2
    pool.give_back(a)
    assert pool.in_use == 1
    pool.give_back(b)
    assert pool.in_use == 0 and pool.high_water == 2 and pool.available == 4


def test_slabs_are_disjoint_views_of_one_arena() -> None:
    pool = BufferPool(slab_size=16, slab_count=3)
    slabs = [pool.borrow() for _ in range(3)]
    assert all(s is not None for s in slabs)
    for i, s in enumerate(slabs):
        assert s is not None
        s.view[:] = bytes([i]) * 16
    for i, s in enumerate(slabs):
        assert s is not None
        assert bytes(s.view) == bytes([i]) * 16
    assert len(pool._arenas) == 1 and bytes(pool._arenas[0]) == b"".join(
        bytes([i]) * 16 for i in range(3)
    )


def test_exhaustion_returns_none() -> None:
    pool = BufferPool(slab_size=16, slab_count=2)
    a, b = pool.borrow(), pool.borrow()
    assert a is not None and b is not None
    assert pool.borrow() is None
    assert pool.borrow() is None
    assert pool.exhausted == 2
    pool.give_back(a)
    assert pool.borrow() is a  # LIFO: the warm slab comes back first


def test_double_return_detected() -> None:
    pool = BufferPool(slab_size=16, slab_count=2)
    s = pool.borrow()
    assert s is not None
    pool.give_back(s)
    with pytest.raises(DoubleReturnError):
        pool.give_back(s)
    assert pool.in_use == 0 and pool.available == 2


def test_foreign_slab_rejected() -> None:
    p1 = BufferPool(slab_size=16, slab_count=2)
    p2 = BufferPool(slab_size=16, slab_count=2)
    s = p1.borrow()
    assert s is not None
    with pytest.raises(DoubleReturnError):
        p2.give_back(s)
    assert not p2.owns(s) and p1.owns(s)
    p1.give_back(s)


def test_no_allocation_per_borrow() -> None:
    pool = BufferPool(slab_size=1024, slab_count=8)
    views: dict[int, tuple[Slab, memoryview]] = {}
    for _ in range(3):
        slabs = [pool.borrow() for _ in range(8)]
        for s in slabs:
            assert s is not None
            views.setdefault(s.index, (s, s.view))
            assert views[s.index][0] is s and views[s.index][1] is s.view  # the same objects
        for s in slabs:
            assert s is not None
            pool.give_back(s)
    # And measured: a borrow/give_back cycle allocates nothing, not even temporarily (peak).
    tracemalloc.start()
    try:
        for _ in range(10):  # warm up
            s = pool.borrow()
            assert s is not None
            pool.give_back(s)
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(10_000):
            s = pool.borrow()
            assert s is not None
            pool.give_back(s)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current - base < 512
    assert peak - base < 512


def test_borrow_resets_region() -> None:
    pool = BufferPool(slab_size=16, slab_count=1)
    s = filled(pool, b"abc")
    s.consume(1)
    pool.give_back(s)
    s2 = pool.borrow()
    assert s2 is s and s2.start == 0 and s2.end == 0


def test_grow_by_arenas_up_to_max() -> None:
    pool = BufferPool(slab_size=16, slab_count=2, max_arenas=3)
    assert pool.capacity == 2 and pool.max_capacity == 6
    got = [pool.borrow() for _ in range(6)]
    assert all(s is not None for s in got)
    assert pool.capacity == 6 and len(pool._arenas) == 3
    assert pool.borrow() is None
    for s in got:
        assert s is not None
        pool.give_back(s)
    assert pool.in_use == 0 and pool.available == 6 and pool.high_water == 6


def test_pool_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        BufferPool(slab_size=0, slab_count=1)
    with pytest.raises(ValueError):
        BufferPool(slab_size=16, slab_count=0)


# -- slab ----------------------------------------------------------------------------------------
def test_slab_helpers() -> None:
    pool = BufferPool(slab_size=8, slab_count=1)
    s = pool.borrow()
    assert s is not None
    s.spare()[:3] = b"abc"
    s.commit(3)
    assert bytes(s.data()) == b"abc" and s.filled == 3 and s.free_space() == 5
    s.consume(2)
    assert bytes(s.data()) == b"c" and not s.is_empty
    s.consume(1)
    assert s.is_empty
    with pytest.raises(ValueError):
        s.consume(1)
    with pytest.raises(ValueError):
        s.commit(6)
    pool.give_back(s)


# -- send queue ----------------------------------------------------------------------------------
def test_queue_watermarks_with_hysteresis() -> None:
    pool = BufferPool(slab_size=100, slab_count=10)
    q = SendQueue(pool, high_water=300, low_water=100)
    assert not q and q.is_below_low and not q.is_above_high and not q.throttled
    for _ in range(2):
        q.push_slab(filled(pool, b"x" * 100))
    assert not q.is_above_high and not q.throttled and not q.is_below_low
    q.push_slab(filled(pool, b"x" * 100))
    assert q.is_above_high and q.throttled
    q.consume(150)  # between the marks: still throttled (hysteresis)
    assert not q.is_above_high and not q.is_below_low and q.throttled
    q.push_bytes(b"y" * 50)  # back up, not yet at high
    assert q.throttled
    q.consume(99)  # 101 left: above low
    assert q.throttled
    q.consume(1)  # 100: at the low mark, released
    assert q.is_below_low and not q.throttled
    q.push_bytes(b"z" * 150)  # 250: between the marks from below: not throttled
    assert not q.throttled
    q.clear()
    assert not q.throttled and pool.in_use == 0


def test_queue_rejects_bad_marks() -> None:
    pool = BufferPool(slab_size=16, slab_count=1)
    with pytest.raises(ValueError):
        SendQueue(pool, high_water=10, low_water=20)


def test_consume_returns_slabs_promptly() -> None:
    pool = BufferPool(slab_size=10, slab_count=4)
    q = SendQueue(pool, high_water=1000, low_water=10)
    q.push_slab(filled(pool, b"0123456789"))
    q.push_bytes(b"abc")
    q.push_slab(filled(pool, b"ABCDEFGHIJ"))
    assert pool.in_use == 2 and q.queued_bytes == 23 and q.item_count == 3
    q.consume(9)
    assert pool.in_use == 2 and bytes(q.peek()) == b"9"
    q.consume(1)  # the first slab fully sent: back at once
    assert pool.in_use == 1 and bytes(q.peek()) == b"abc"
    q.consume(3 + 4)  # the bytes chunk and part of the second slab in one call
    assert pool.in_use == 1 and bytes(q.peek()) == b"EFGHIJ"
    q.consume(6)
    assert pool.in_use == 0 and not q and q.item_count == 0
    assert bytes(q.peek()) == b""  # an idle queue holds nothing
    with pytest.raises(ValueError):
        q.consume(1)


def test_empty_pushes_are_ignored() -> None:
    pool = BufferPool(slab_size=10, slab_count=1)
    q = SendQueue(pool)
    slab = pool.borrow()
    assert slab is not None
    q.push_slab(slab)  # empty: straight back to the pool
    q.push_bytes(b"")
    q.push(b"")
    assert pool.in_use == 0 and not q and q.item_count == 0


def test_push_dispatches_by_type() -> None:
    pool = BufferPool(slab_size=10, slab_count=1)
    q = SendQueue(pool)
    q.push(filled(pool, b"ab"))
    q.push(b"cd")
    assert q.slabs_held == 1 and q.queued_bytes == 4
    q.consume(4)
    assert pool.in_use == 0


def test_clear_returns_everything() -> None:
    pool = BufferPool(slab_size=10, slab_count=4)
    q = SendQueue(pool)
    for _ in range(4):
        q.push_slab(filled(pool, b"x" * 10))
    q.push_bytes(b"tail")
    q.consume(5)
    assert pool.in_use == 4 and pool.borrow() is None
    q.clear()
    assert pool.in_use == 0 and not q and q.queued_bytes == 0
    q.clear()  # idempotent


# -- the opportunistic write ---------------------------------------------------------------------
@pytest.fixture
def small_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A non-blocking unix stream pair with small buffers so that the sender fills up fast."""
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * KIB)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KIB)
    yield a, b
    a.close()
    b.close()


def drain(sock: socket.socket, into: bytearray) -> int:
    """Read everything available now (non-blocking); returns bytes read."""
    total = 0
    buf = bytearray(64 * KIB)
    while True:
        try:
            n = sock.recv_into(buf)
        except BlockingIOError:
            return total
        if n == 0:
            return total
        into += buf[:n]
        total += n


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


def test_flush_to_socket_partial_then_drains(
    small_pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = small_pair
    pool = BufferPool(slab_size=64 * KIB, slab_count=16)
    q = SendQueue(pool)
    expected = bytearray()
    for i in range(8):  # 512 KiB, far more than the socket buffers hold
        chunk = pattern(64 * KIB, seed=i)
        expected += chunk
        q.push_slab(filled(pool, chunk))
        if i == 3:
            ct = pattern(1000, seed=99)  # a ciphertext-like bytes chunk in the middle
            expected += ct
            q.push_bytes(ct)
    total = q.queued_bytes
    assert flush_to_socket(a, q) is False  # the peer does not read: partial sends, then EAGAIN
    assert 0 < q.queued_bytes < total
    assert pool.in_use == q.slabs_held  # slabs already sent in full went back
    assert flush_to_socket(a, q) is False  # still full: EAGAIN, nothing lost
    stuck = q.queued_bytes
    assert flush_to_socket(a, q) is False and q.queued_bytes == stuck
    received = bytearray()
    for _ in range(10_000):  # bounded: each round moves at least one byte
        drain(b, received)
        if flush_to_socket(a, q):
            break
    else:
        pytest.fail("queue never drained")
    drain(b, received)
    assert not q and pool.in_use == 0
    assert received == expected


def test_flush_single_item_uses_send(small_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = small_pair
    pool = BufferPool(slab_size=1024, slab_count=1)
    q = SendQueue(pool)
    q.push_slab(filled(pool, b"hello"))
    assert q.flush_to(a) is True and pool.in_use == 0
    got = bytearray()
    drain(b, got)
    assert got == b"hello"


def test_flush_empty_queue_is_drained(small_pair: tuple[socket.socket, socket.socket]) -> None:
    pool = BufferPool(slab_size=16, slab_count=1)
    assert SendQueue(pool).flush_to(small_pair[0]) is True


def test_flush_raises_real_errors(small_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = small_pair
    pool = BufferPool(slab_size=16, slab_count=2)
    q = SendQueue(pool)
    q.push_slab(filled(pool, b"data"))
    b.close()
    with pytest.raises(OSError):
        flush_to_socket(a, q)
    assert q.queued_bytes == 4 and pool.in_use == 1  # left for the close path
    q.clear()
    assert pool.in_use == 0


# -- consistency under random sequences ----------------------------------------------------------
class PoolAndQueue(RuleBasedStateMachine):
    """Random borrow/fill/push/consume/give-back/clear: the books must always balance."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BufferPool(slab_size=16, slab_count=6)
        self.queue = SendQueue(self.pool, high_water=40, low_water=10)
        self.held: list[Slab] = []  # borrowed, not queued
        self.model = bytearray()  # what the queue should send, in order
        self.throttled = False

    def _after_add(self) -> None:
        if len(self.model) >= 40:
            self.throttled = True

    @rule()
    def borrow(self) -> None:
        slab = self.pool.borrow()
        if len(self.held) + self.queue.slabs_held == 6:
            assert slab is None
        else:
            assert slab is not None
            self.held.append(slab)

    @precondition(lambda self: bool(self.held))
    @rule(data=st.binary(max_size=16), i=st.integers(min_value=0))
    def push_slab(self, data: bytes, i: int) -> None:
        slab = self.held.pop(i % len(self.held))
        slab.view[: len(data)] = data
        slab.commit(len(data))
        self.queue.push_slab(slab)
        self.model += data
        self._after_add()

    @rule(data=st.binary(max_size=20))
    def push_bytes(self, data: bytes) -> None:
        self.queue.push_bytes(data)
        self.model += data
        self._after_add()

    @precondition(lambda self: bool(self.held))
    @rule(i=st.integers(min_value=0))
    def give_back(self, i: int) -> None:
        self.pool.give_back(self.held.pop(i % len(self.held)))

    @rule(n=st.integers(min_value=0, max_value=60))
    def consume(self, n: int) -> None:
        n = min(n, len(self.model))
        self.queue.consume(n)
        del self.model[:n]
        if len(self.model) <= 10:
            self.throttled = False

    @rule()
    def clear(self) -> None:
        self.queue.clear()
        self.model.clear()
        self.throttled = False

    @invariant()
    def books_balance(self) -> None:
        pool, queue = self.pool, self.queue
        assert pool.in_use == len(self.held) + queue.slabs_held
        assert pool.in_use + pool.available == pool.capacity
        assert queue.queued_bytes == len(self.model)
        assert queue.throttled == self.throttled
        assert bool(queue) == bool(self.model)
        head = bytes(queue.peek())
        assert self.model.startswith(head)
        assert bool(head) == bool(self.model)
        assert all(item.filled > 0 for item in queue._items)  # no empty chunk ever queued


TestPoolAndQueue = PoolAndQueue.TestCase


def test_send_or_push_sends_straight_when_empty_and_queues_behind_others() -> None:
    pool = BufferPool(slab_size=16, slab_count=2)
    q = SendQueue(pool, high_water=64, low_water=8)
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        slab = pool.borrow()
        assert slab is not None
        slab.view[:5] = b"hello"
        slab.start, slab.end = 0, 5
        q.send_or_push(a, slab)  # nothing queued: sent at once, slab back in the pool
        assert not q and pool.in_use == 0 and b.recv(16) == b"hello"
        q.push_bytes(b"first ")
        q.send_or_push(a, b"second")  # behind a queued chunk: queued, then flushed in order
        assert not q and b.recv(32) == b"first second"
        b.close()
        with pytest.raises(OSError):
            q.send_or_push(a, b"lost peer")
        assert q.queued_bytes == len(b"lost peer")  # kept for clear()
        q.clear()
