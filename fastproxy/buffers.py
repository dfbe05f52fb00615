"""The buffer pool and the per-direction send queue: where forwarded bytes live while in flight.

The pool
========
:class:`BufferPool` allocates ONE ``bytearray`` (an *arena*) of ``slab_size * slab_count`` bytes at
construction and carves it into :class:`Slab` objects, each holding a ``memoryview`` of its part of
the arena. The slab objects and their memoryviews are created once and reused forever: a borrow
pops a slab off a free stack, a return pushes it back, and neither allocates. The stack is LIFO so
the slab handed out next is the one most recently used, still warm in the CPU cache. (The stack
holds the slab objects themselves rather than their indices: same zero allocation, one indexing
fewer per borrow.)

Exhaustion is backpressure, not an error: :meth:`BufferPool.borrow` returns None and the caller
stops reading from its socket until data drains and slabs come back. Memory for in-flight data is
therefore bounded by the pool, whatever the number of connections. With ``max_arenas > 1`` the
pool instead grows by one whole arena of ``slab_count`` slabs when it runs dry, up to
``max_arenas`` arenas (``slab_count * max_arenas`` slabs); it never shrinks, because an arena can
only be freed once every one of its slabs is back and the memoryviews into it are gone, and a
process that needed the memory once is likely to need it again. Growing allocates (and zero-fills)
a whole arena inside a ``borrow`` call, a one-off cost of a few milliseconds per 16 MiB.

A slab returned twice would be handed to two connections at once and interleave their bytes, so
:meth:`BufferPool.give_back` checks a per-slab ``borrowed`` flag (and that the slab is this pool's)
and raises :class:`DoubleReturnError`: two attribute reads and an identity test, always on.

Slab contents are not cleared on return: every reader only looks at ``[start:end]``, which the
current borrower wrote.

The send queue and the opportunistic write
==========================================
:class:`SendQueue` is the outbound queue of one direction of one connection: a list of filled
slabs (and of ``bytes`` chunks, for ciphertext from OpenSSL's ``bio_read``, which allocates a new
``bytes`` anyway, so wrapping it costs less than copying it into a slab). The pattern it supports::

    queue.push_slab(slab)            # the data just read / decrypted into a pooled slab
    if not queue.flush_to(sock):     # try to send NOW: usually the kernel takes everything
        loop.modify(fd, ..., write=True)   # only the remainder stays queued; watch writability
    ...
    # on_writable:
    if queue.flush_to(sock):
        loop.modify(fd, ..., write=False)  # drained: stop watching writability

So writability is watched only while something is queued, and a slab is given back to the pool
the moment its last byte is sent (:meth:`SendQueue.consume`): an idle connection holds NO slab,
and ten thousand idle connections cost no buffer memory. The queue itself is a plain list, not a
deque: an empty deque costs ~630 bytes (it always holds one 64-slot block), an empty list 56, and
a queue rarely holds more than a few chunks (the high-water mark bounds it), so dropping sent
chunks from the front with one ``del items[:k]`` is as cheap as ``popleft``.

Watermarks: :attr:`SendQueue.is_above_high` (``queued_bytes >= high_water``) and
:attr:`SendQueue.is_below_low` (``queued_bytes <= low_water``) are plain comparisons;
:attr:`SendQueue.throttled` latches between them (set when the queue reaches the high mark, cleared
only when it falls to the low mark). Use ``throttled`` to decide whether to read the *other* side:
the hysteresis keeps a queue hovering around one mark from toggling read interest (an
``epoll_ctl``) on every slab.

Copies per forwarded byte, plaintext side
=========================================
``sock.recv_into(slab.spare())`` -- the kernel copies socket data straight into the slab (one
kernel-to-user copy); ``sock.send(slab.data())`` -- the kernel copies from the same memory (one
user-to-kernel copy). Zero user-space copies: no ``bytes`` is created per read, and slicing a
memoryview copies nothing (it allocates one small memoryview object, not the data). The TLS side
adds its own copies; see :mod:`fastproxy.tls`.
"""

from __future__ import annotations

import socket

__all__ = [
    "DEFAULT_HIGH_WATER",
    "DEFAULT_LOW_WATER",
    "DEFAULT_SLAB_COUNT",
    "DEFAULT_SLAB_SIZE",
    "BufferPool",
    "DoubleReturnError",
    "SendQueue",
    "Slab",
    "Span",
    "flush_to_socket",
]

#: 64 KiB: four TLS records' worth of plaintext, large enough that per-read Python overhead is
#: small next to the copy, small enough that thousands of busy connections fit in memory.
DEFAULT_SLAB_SIZE = 64 * 1024
#: 256 slabs = 16 MiB per arena.
DEFAULT_SLAB_COUNT = 256
#: Stop reading the other side once this much waits for one socket (four default slabs)...
DEFAULT_HIGH_WATER = 256 * 1024
#: ...and resume once it has drained to this (one slab).
DEFAULT_LOW_WATER = 64 * 1024

#: At most this many queued chunks go into one ``sendmsg`` (Linux IOV_MAX is 1024).
SENDMSG_MAX_BUFFERS = 64

_EMPTY = memoryview(b"")


class DoubleReturnError(ValueError):
    """A slab was given back that is not currently borrowed from this pool (a bug)."""


class Span:
    """A region ``[start:end]`` of a buffer: the common shape of queued data.

    A bare :class:`Span` wraps a ``bytes`` chunk; a :class:`Slab` is a span over pooled memory.
    """

    __slots__ = ("end", "start", "view")

    def __init__(self, view: memoryview, start: int, end: int) -> None:
        self.view = view
        self.start = start
        self.end = end

    def data(self) -> memoryview:
        """The filled region, ``view[start:end]`` (a new memoryview object, no data copy)."""
        return self.view[self.start : self.end]

    @property
    def filled(self) -> int:
        """Bytes in the filled region (``end - start``)."""
        return self.end - self.start

    @property
    def is_empty(self) -> bool:
        return self.start >= self.end

    def consume(self, n: int) -> None:
        """Mark ``n`` bytes at the front of the filled region as used (sent)."""
        if n < 0 or n > self.end - self.start:
            raise ValueError(f"cannot consume {n} of {self.end - self.start} bytes")
        self.start += n


class Slab(Span):
    """One fixed-size piece of a pool's arena. Created once by the pool; never construct one.

    ``view`` is the whole slab (always ``size`` bytes); ``start``/``end`` delimit the filled
    region. Fill it with ``n = sock.recv_into(slab.spare())`` then ``slab.commit(n)`` (or set
    ``start``/``end`` directly).
    """

    __slots__ = ("borrowed", "index", "size")

    def __init__(self, view: memoryview, index: int) -> None:
        super().__init__(view, 0, 0)
        self.size = len(view)
        self.index = index
        self.borrowed = False

    def free_space(self) -> int:
        """Bytes still free after the filled region."""
        return self.size - self.end

    def spare(self) -> memoryview:
        """The free tail, ``view[end:]``, to ``recv_into``."""
        return self.view[self.end :]

    def commit(self, n: int) -> None:
        """Extend the filled region by ``n`` bytes just written into :meth:`spare`."""
        if n < 0 or n > self.size - self.end:
            raise ValueError(f"cannot commit {n} bytes, {self.size - self.end} free")
        self.end += n

    def reset(self) -> None:
        self.start = self.end = 0

    def __repr__(self) -> str:
        state = "borrowed" if self.borrowed else "free"
        return f"<Slab #{self.index} [{self.start}:{self.end}] of {self.size} {state}>"


class BufferPool:
    """Preallocated fixed-size slabs; borrow/give back without allocating. Loop thread only.

    ``in_use``, ``high_water`` (the most slabs ever out at once) and ``exhausted`` (how many
    borrows found no slab) are plain attributes, cheap to keep on the hot path and to snapshot.
    """

    __slots__ = (
        "_arenas",
        "_free",
        "_slabs",
        "exhausted",
        "high_water",
        "in_use",
        "max_arenas",
        "slab_count",
        "slab_size",
    )

    def __init__(
        self,
        slab_size: int = DEFAULT_SLAB_SIZE,
        slab_count: int = DEFAULT_SLAB_COUNT,
        max_arenas: int = 1,
    ) -> None:
        if slab_size <= 0 or slab_count <= 0 or max_arenas <= 0:
            raise ValueError("slab_size, slab_count and max_arenas must be positive")
        self.slab_size = slab_size
        self.slab_count = slab_count  # per arena
        self.max_arenas = max_arenas
        self._arenas: list[bytearray] = []
        self._slabs: list[Slab] = []  # every slab, by index (ownership check)
        self._free: list[Slab] = []  # LIFO stack
        self.in_use = 0
        self.high_water = 0
        self.exhausted = 0
        self._grow()

    def _grow(self) -> bool:
        """Add one arena of ``slab_count`` slabs; False if ``max_arenas`` is reached."""
        if len(self._arenas) >= self.max_arenas:
            return False
        size, count = self.slab_size, self.slab_count
        arena = bytearray(size * count)
        whole = memoryview(arena)
        base = len(self._slabs)
        slabs = [Slab(whole[i * size : (i + 1) * size], base + i) for i in range(count)]
        self._arenas.append(arena)
        self._slabs.extend(slabs)
        # Reversed so that pop() hands out the lowest index first (tidy, and easy to test).
        self._free[:0] = reversed(slabs)
        return True

    @property
    def capacity(self) -> int:
        """Slabs the pool holds now (grows by ``slab_count`` per extra arena)."""
        return len(self._slabs)

    @property
    def max_capacity(self) -> int:
        return self.slab_count * self.max_arenas

    @property
    def available(self) -> int:
        """Free slabs right now (not counting arenas the pool could still add)."""
        return len(self._free)

    def borrow(self) -> Slab | None:
        """An empty slab, or None when the pool is exhausted (stop reading: backpressure)."""
        free = self._free
        if not free and not self._grow():
            self.exhausted += 1
            return None
        slab = free.pop()
        slab.borrowed = True
        slab.start = slab.end = 0
        n = self.in_use + 1
        self.in_use = n
        if n > self.high_water:
            self.high_water = n
        return slab

    def give_back(self, slab: Slab) -> None:
        """Return a borrowed slab. Raises :class:`DoubleReturnError` if it is not out from here."""
        slabs = self._slabs
        i = slab.index
        if not slab.borrowed or i >= len(slabs) or slabs[i] is not slab:
            raise DoubleReturnError(
                f"{slab!r} is not borrowed from this pool (returned twice, or another pool's)"
            )
        slab.borrowed = False
        self._free.append(slab)
        self.in_use -= 1

    def owns(self, slab: Slab) -> bool:
        return slab.index < len(self._slabs) and self._slabs[slab.index] is slab

    def __repr__(self) -> str:
        return (
            f"<BufferPool {self.in_use}/{self.capacity} slabs of {self.slab_size} in use, "
            f"high water {self.high_water}>"
        )


class SendQueue:
    """The outbound bytes of one direction, with watermarks. Loop thread only.

    Owns every slab pushed into it until the slab's last byte is consumed (then it goes straight
    back to the pool) or :meth:`clear` is called. Truthy while anything is queued.
    """

    __slots__ = ("_items", "_pool", "high_water", "low_water", "queued_bytes", "throttled")

    def __init__(
        self,
        pool: BufferPool,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int = DEFAULT_LOW_WATER,
    ) -> None:
        if not 0 <= low_water <= high_water:
            raise ValueError(f"need 0 <= low_water ({low_water}) <= high_water ({high_water})")
        self._pool = pool
        self._items: list[Span] = []
        self.high_water = high_water
        self.low_water = low_water
        self.queued_bytes = 0
        #: Latched: True from reaching ``high_water`` until draining to ``low_water``.
        self.throttled = False

    def __bool__(self) -> bool:
        return self.queued_bytes > 0

    @property
    def is_above_high(self) -> bool:
        """``queued_bytes >= high_water``: stop reading the side that feeds this queue."""
        return self.queued_bytes >= self.high_water

    @property
    def is_below_low(self) -> bool:
        """``queued_bytes <= low_water``: reading the feeding side may resume."""
        return self.queued_bytes <= self.low_water

    @property
    def item_count(self) -> int:
        """Queued chunks (slabs and ``bytes``)."""
        return len(self._items)

    @property
    def slabs_held(self) -> int:
        """Pooled slabs held (walks the queue: for tests and stats, not the hot path)."""
        return sum(1 for item in self._items if type(item) is Slab)

    def _added(self, n: int) -> None:
        q = self.queued_bytes + n
        self.queued_bytes = q
        if q >= self.high_water:
            self.throttled = True

    def push_slab(self, slab: Slab) -> None:
        """Queue a slab's filled region; the queue now owns the slab (an empty one goes back)."""
        n = slab.end - slab.start
        if n <= 0:
            self._pool.give_back(slab)
            return
        self._items.append(slab)
        self._added(n)

    def push_bytes(self, data: bytes) -> None:
        """Queue an immutable ``bytes`` chunk (e.g. from ``bio_read``) without copying it.

        Only ``bytes``: a mutable buffer (a scratch bytearray) could change before it is sent.
        """
        n = len(data)
        if n:
            self._items.append(Span(memoryview(data), 0, n))
            self._added(n)

    def push(self, item: Slab | bytes) -> None:
        """:meth:`push_slab` or :meth:`push_bytes`, by type."""
        if isinstance(item, Slab):
            self.push_slab(item)
        else:
            self.push_bytes(item)

    def peek(self) -> memoryview:
        """The first queued chunk's unsent bytes (empty if nothing is queued)."""
        if not self._items:
            return _EMPTY
        return self._items[0].data()

    def consume(self, n: int) -> None:
        """Drop ``n`` sent bytes from the front; fully sent slabs go back to the pool at once."""
        if n <= 0:
            if n < 0:
                raise ValueError("negative consume")
            return
        if n > self.queued_bytes:
            raise ValueError(f"cannot consume {n} bytes, {self.queued_bytes} queued")
        q = self.queued_bytes - n
        self.queued_bytes = q
        if self.throttled and q <= self.low_water:
            self.throttled = False
        items = self._items
        done = 0  # items[:done] are fully sent
        try:
            while n:
                head = items[done]
                left = head.end - head.start
                if n < left:
                    head.start += n
                    return
                n -= left
                done += 1
                if type(head) is Slab:
                    self._pool.give_back(head)
        finally:
            if done:
                del items[:done]

    def clear(self) -> None:
        """Drop everything queued and return every slab to the pool (the close path)."""
        items, pool = self._items, self._pool
        while items:
            head = items.pop()
            if type(head) is Slab:
                pool.give_back(head)
        self.queued_bytes = 0
        self.throttled = False

    def flush_to(self, sock: socket.socket) -> bool:
        """Send as much as the socket takes now; True when the queue is drained.

        Stops at the first partial send (the kernel buffer is full, the next call would only
        return EAGAIN: one syscall saved) or at ``BlockingIOError``. Several queued chunks go
        out in one ``sendmsg`` (gather write). Real errors (``EPIPE``, ``ECONNRESET``, ...) are
        raised as ``OSError``; the queue is left as it was for them, for :meth:`clear`.
        """
        items = self._items
        while items:
            try:
                if len(items) == 1:
                    head = items[0]
                    want = head.end - head.start
                    sent = sock.send(head.view[head.start : head.end])
                else:
                    bufs = [it.view[it.start : it.end] for it in items[:SENDMSG_MAX_BUFFERS]]
                    want = sum(len(b) for b in bufs)
                    sent = sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                return False
            self.consume(sent)
            if sent < want:
                return False
        return True

    def send_or_push(self, sock: socket.socket, item: Slab | bytes) -> None:
        """Queue ``item`` and flush; when nothing is queued ahead of it (the usual case for a
        request or its reply), send it straight away and queue only what the kernel left, with
        no queue bookkeeping. A fully sent slab goes back to the pool at once. Real socket
        errors are raised as ``OSError`` (the item is then queued, for :meth:`clear`)."""
        if self._items:
            self.push(item)
            self.flush_to(sock)
            return
        data = item.view[item.start : item.end] if isinstance(item, Slab) else item
        n = len(data)
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.push(item)
            raise
        if sent == n:
            if type(item) is Slab:
                self._pool.give_back(item)
            return
        self.push(item)
        self.consume(sent)

    def __repr__(self) -> str:
        return (
            f"<SendQueue {self.queued_bytes} bytes in {len(self._items)} chunks, "
            f"marks {self.low_water}/{self.high_water}{' throttled' if self.throttled else ''}>"
        )


def flush_to_socket(sock: socket.socket, queue: SendQueue) -> bool:
    """The opportunistic write: send until the queue is empty or the socket would block.

    Returns True if drained (stop watching writability), False if something remains (watch
    it). Raises ``OSError`` for real socket errors. Same as :meth:`SendQueue.flush_to`.
    """
    return queue.flush_to(sock)
