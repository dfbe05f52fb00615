"""Keeping client certificates fresh: one refresher thread for all instances (protocol §5).

``refresh`` knows time. It decides *when* to call the Admin API, calls it, turns the answer into a
new immutable :class:`~fastproxy.source.DialInfo` and publishes it; it never touches a socket, and
the event loop never waits for it.

Threads
=======
* **The refresher thread** (one per process, :class:`Refresher`) owns the process's RSA key (it is
  generated there, at start: key generation costs tens of milliseconds of CPU that must not stall
  the loop), the fetcher (HTTP), the token sources (may do HTTP), the token buckets and the
  schedule. It sleeps on a :class:`threading.Condition` until the earliest due time in a heap of
  ``(due, seq, instance)``; a thread per instance would cost a stack per instance and make the rate
  limiting and shutdown harder to reason about.
* **The loop thread** only *reads*: :meth:`RefreshingSource.current` is one attribute read plus a
  ``time.time()`` comparison. The loop calls into the refresher for two things only, both
  non-blocking: a forced refresh (``dial_failed``, an expired certificate) and, in lazy mode, a
  refresh request. Both take the condition's lock for a few dictionary/heap operations; the
  refresher never holds that lock while doing I/O, so the loop never waits behind a fetch.
* Callbacks registered with ``when_ready`` are stored and run by the loop thread only: after each
  publication the refresher calls ``loop.call_soon_threadsafe(source._run_waiters)``, the only way
  into the loop thread.

Atomic publication
==================
Everything a source shows the loop lives in one frozen :class:`_State` ``(info, token_expires_at,
error)``, replaced with a single reference assignment. A reader sees the old state or the new one,
never an info from one refresh with the error of another. Each successful certificate refresh
builds a *new* ``SSL.Context`` (contexts are never mutated once published) and takes a new
process-wide generation number from :func:`fastproxy.source.next_generation`; connections already
dialling keep the ``DialInfo`` (and context) they copied when they started.

Exchange tokens
===============
The metadata exchange sends an OAuth2 token (``DialInfo.exchange_token``). It is obtained from the
source's :data:`TokenSource` on the refresher thread, never on the loop. When a token comes with an
expiry, the refresher schedules a token-only republication :data:`TOKEN_REFRESH_MARGIN` seconds
before it: a new ``DialInfo`` with the **same context and the same generation** (the generation
names a certificate, and the certificate did not change) and the new token. A token without an
expiry (a static ``--token``) is never re-fetched.

Wall clock and monotonic clock
==============================
Certificate expiry is wall time (POSIX seconds, ``time.time``); the schedule runs on the monotonic
clock so that a clock step does not fire or postpone every refresh. On Linux the monotonic clock
stops while the machine is suspended, so after a laptop sleep the scheduled refresh can be late
while the certificate has already expired; ``current()`` therefore checks the wall-clock expiry on
every call and, if it has passed, returns None (connections wait in PENDING) and forces a refresh.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from OpenSSL import SSL

from fastproxy.errors import ConfigError, FastproxyError
from fastproxy.instance_uri import InstanceURI
from fastproxy.mdx import AuthType
from fastproxy.source import SERVER_PORT, USER_AGENT, DialInfo, IPType, next_generation
from fastproxy.stats import RefreshSnapshot

if TYPE_CHECKING:
    from fastproxy.admin import InstanceMaterial

__all__ = [
    "REFRESH_BUFFER",
    "TOKEN_REFRESH_MARGIN",
    "Fetcher",
    "LazySource",
    "RefreshError",
    "Refresher",
    "RefreshingSource",
    "TokenBucket",
    "TokenSource",
    "next_refresh_delay",
]

log = logging.getLogger("fastproxy.refresh")

#: Refresh this long before the certificate expires (Go ``refreshBuffer``, protocol §5.1).
REFRESH_BUFFER: Final = 240.0
#: Certificates valid for less than this are refreshed ``REFRESH_BUFFER`` before expiry; longer
#: ones at half their remaining life (protocol §5.2).
_HALF_LIFE_THRESHOLD: Final = 3600.0
#: Admin API rate limit per instance: one refresh per 30 s, burst 2 (Go ``rate.NewLimiter``).
RATE: Final = 1.0 / 30.0
BURST: Final = 2
#: Re-fetch the exchange token this long before it expires, so no dial ever sends a stale one.
TOKEN_REFRESH_MARGIN: Final = 300.0
#: A token source that keeps handing out a token already inside the margin (google-auth only
#: refreshes 3m45s before expiry) is asked again at most this often, not in a busy loop.
TOKEN_MIN_RECHECK: Final = 30.0
#: After a failed token fetch, try again this much later (the old token may still be valid).
TOKEN_RETRY: Final = 10.0
#: ``Refresher.stop`` waits this long for the thread; a fetch in flight is bounded by its own
#: timeouts and the thread is a daemon, so a stuck HTTP call cannot hold up process exit.
STOP_JOIN_TIMEOUT: Final = 1.5


class RefreshError(FastproxyError):
    """A refresh failed for a reason other than an Admin API error (bad material, TLS, token)."""


# --------------------------------------------------------------------------------------------------
# pure rules


def next_refresh_delay(now: float, expiry: float) -> float:
    """Seconds to wait before refreshing a certificate expiring at ``expiry`` (protocol §5.2).

    With ``d = expiry - now``: below one hour, refresh ``REFRESH_BUFFER`` (4 min) before expiry, or
    at once when less than that is left; from one hour up, at half the remaining life. This is Go's
    ``refreshDuration``; unlike the Python connector ``d`` is not truncated to whole seconds.
    """
    d = expiry - now
    if d < _HALF_LIFE_THRESHOLD:
        return 0.0 if d < REFRESH_BUFFER else d - REFRESH_BUFFER
    return d / 2.0


class TokenBucket:
    """A token bucket: ``burst`` tokens, refilled at ``rate`` per second (Go ``rate.Limiter``).

    Not thread-safe on its own: the refresher only touches it under its condition's lock.
    """

    def __init__(
        self, rate: float = RATE, burst: int = BURST, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def _fill(self) -> None:
        now = self._clock()
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._last = now

    def try_take(self) -> bool:
        """Take one token if one is available now."""
        self._fill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def time_until_token(self) -> float:
        """Seconds until ``try_take`` would succeed (0 if it would now)."""
        self._fill()
        if self._tokens >= 1.0:
            return 0.0
        return (1.0 - self._tokens) / self._rate


# --------------------------------------------------------------------------------------------------
# what the refresher plugs into


class Fetcher(Protocol):
    """One refresh at the Admin API (``fastproxy.admin.AdminClient`` satisfies it). Blocking."""

    def fetch(
        self, uri: InstanceURI, public_key_pem: str, *, use_metadata_exchange: bool = True
    ) -> InstanceMaterial: ...


#: Returns ``(access token, expiry as POSIX seconds or None)``. Blocking; refresher thread only.
TokenSource = Callable[[], tuple[str, float | None]]


class LoopWaker(Protocol):
    """The one thing the refresher may do to the loop (``fastproxy.loop.Loop`` satisfies it)."""

    def call_soon_threadsafe(self, fn: Callable[..., object], *args: object) -> bool: ...


KeyFactory = Callable[[], RSAPrivateKey]
ContextFactory = Callable[[Sequence[str], RSAPrivateKey, str], SSL.Context]


def _default_key_factory() -> RSAPrivateKey:
    from fastproxy.keys import generate_key

    return generate_key()


def _default_context_factory(
    chain_pems: Sequence[str], key: RSAPrivateKey, ca_pem: str
) -> SSL.Context:
    from fastproxy.tlsctx import build_client_context

    return build_client_context(chain_pems, key, ca_pem)


def _public_key_pem(key: RSAPrivateKey) -> str:
    from fastproxy.keys import public_key_pem

    return public_key_pem(key)


def _as_refresh_error(exc: Exception, what: str, instance: str) -> FastproxyError:
    """Our own errors pass through (they are one clear line already); others get wrapped."""
    if isinstance(exc, FastproxyError):
        return exc
    detail = " ".join(str(exc).split())[:300] or type(exc).__name__
    return RefreshError(f"{what} failed for instance {instance}: {detail}")


# --------------------------------------------------------------------------------------------------
# sources


@dataclass(frozen=True, slots=True)
class _State:
    """What a source shows the loop, replaced as a whole (one reference assignment)."""

    info: DialInfo | None = None
    token_expires_at: float | None = None  # POSIX seconds; None = no expiry known
    error: Exception | None = None

    def valid_at(self, now: float) -> bool:
        info = self.info
        if info is None or now >= info.expires_at:
            return False
        return self.token_expires_at is None or now < self.token_expires_at


class _SourceBase:
    """Common part of the refresh-ahead and lazy sources (ConnectionInfoSource protocol)."""

    _lazy = False

    def __init__(
        self,
        refresher: Refresher,
        uri: InstanceURI,
        ip_type: str = IPType.PRIVATE,
        *,
        auto_iam: bool = False,
        metadata_exchange: bool = True,
        user_agent: str = USER_AGENT,
        token_source: TokenSource | None = None,
        port: int = SERVER_PORT,
    ) -> None:
        if ip_type not in (IPType.PRIVATE, IPType.PUBLIC, IPType.PSC):
            raise ValueError(f"unknown IP type {ip_type!r}")
        if metadata_exchange and token_source is None:
            raise ConfigError(
                "the metadata exchange needs an OAuth2 token source (credentials or --token)"
            )
        self.name = uri.short
        self.uri = uri
        self.ip_type = ip_type
        self.auth_type = AuthType.AUTO_IAM if auto_iam else AuthType.DB_NATIVE
        self.metadata_exchange = metadata_exchange
        self.user_agent = user_agent
        self.port = port
        self._token_source = token_source
        self._wall = refresher.wall
        self._refresher = refresher
        self._state = _State()
        # Loop thread only: callbacks waiting for the next publication.
        self._waiters: list[Callable[[], None]] = []
        # Refresher thread only: monotonic due time of the next token-only republication.
        self._token_due: float | None = None
        self._entry = refresher._register(self)

    # -- loop thread -------------------------------------------------------------------------------
    def error(self) -> Exception | None:
        """The last refresh error, but only while there is no valid info to dial with."""
        state = self._state
        if state.error is None or state.valid_at(self._wall()):
            return None
        return state.error

    def when_ready(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop thread after the next publication (info or error)."""
        self._waiters.append(callback)

    def _run_waiters(self) -> None:
        # Loop thread (scheduled with call_soon_threadsafe). Swap first: a callback that finds
        # nothing new registers again for the *next* publication, not this one.
        waiters, self._waiters = self._waiters, []
        for callback in waiters:
            try:
                callback()
            except Exception:  # a bug in one connection must not starve the others
                log.exception("when_ready callback for %s failed", self.name)

    # -- refresher thread --------------------------------------------------------------------------
    def _publish(self, state: _State, waker: LoopWaker) -> None:
        self._state = state  # the one reference assignment the loop thread may observe
        waker.call_soon_threadsafe(self._run_waiters)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.ip_type}>"


class RefreshingSource(_SourceBase):
    """Refresh-ahead connection info (the default; Go ``RefreshAheadCache``, protocol §5.3).

    Registration schedules an immediate refresh; from then on the refresher keeps the certificate
    fresh in the background, so ``current()`` is normally a read of ready data.
    """

    def current(self) -> DialInfo | None:
        """The last good info while its certificate (and token) are valid, else None.

        An expired certificate (the schedule can be late after a suspend) forces a refresh; the
        caller then waits in PENDING through ``when_ready``.
        """
        state = self._state
        if state.info is None:
            return None
        if state.valid_at(self._wall()):
            return state.info
        self._refresher.force(self._entry)
        return None

    def dial_failed(self, reason: str) -> None:
        """A TCP/TLS failure: the address or certificate may be stale. Rate-limited refresh."""
        log.debug("dial to %s failed (%s): forcing a refresh", self.name, reason)
        self._refresher.force(self._entry)


class LazySource(_SourceBase):
    """Lazy connection info (``--lazy-refresh``; Go ``LazyRefreshCache``, protocol §5.4).

    No background schedule and no rate limiter, as in Go. A refresh is requested when a dial finds
    no info, a certificate within ``REFRESH_BUFFER`` of expiry, a token within
    ``TOKEN_REFRESH_MARGIN`` of expiry, or a refresh forced by a failed dial.

    Difference from Go: Go refreshes synchronously in the dialling goroutine (the dial blocks on the
    Admin API). The loop must never block, so here the request goes to the refresher thread and the
    dial goes on with the cached info if it is still valid, or waits in PENDING if not. Concurrent
    dials share one request instead of each calling the API. A dial that finds no valid info and an
    error from the previous attempt fails at once with that error while the new attempt runs in
    the background (Go would report this attempt's error).
    """

    _lazy = True
    # Set by dial_failed (Go's needsRefresh). A class default rather than an __init__ override:
    # the base constructor registers with the refresher, and this must exist before that.
    _needs_refresh = False

    def current(self) -> DialInfo | None:
        state = self._state
        info = state.info
        now = self._wall()
        forced = self._needs_refresh
        stale = (
            info is None
            or forced
            or now >= info.expires_at - REFRESH_BUFFER
            or (
                state.token_expires_at is not None
                and now >= state.token_expires_at - TOKEN_REFRESH_MARGIN
            )
        )
        if stale:
            self._needs_refresh = False
            self._refresher.request(self._entry, full=forced)
        return info if state.valid_at(now) else None

    def dial_failed(self, reason: str) -> None:
        """Mark the cache stale; the next dial asks for a refresh (Go ``ForceRefresh``)."""
        log.debug("dial to %s failed (%s): next dial refreshes", self.name, reason)
        self._needs_refresh = True


# --------------------------------------------------------------------------------------------------
# the refresher


@dataclass(eq=False)
class _Instance:
    """The refresher's bookkeeping for one (instance, exchange on/off, lazy) combination.

    Scheduling fields (``cert_due``, ``heap_seq``, ``running``, the ``force_*`` flags,
    ``attempted``) and the bucket are guarded by the refresher's condition; the material and
    context are written by the refresher thread only.
    """

    uri: InstanceURI
    use_mdx: bool
    lazy: bool
    bucket: TokenBucket
    sources: list[_SourceBase] = field(default_factory=list)
    cert_due: float | None = None  # monotonic; None = nothing scheduled
    heap_seq: int = -1  # the seq of this entry's live heap item; older items are stale
    running: bool = False
    force_full: bool = False
    force_after_run: bool = False
    attempted: bool = False  # a first certificate attempt finished (wait_first)
    material: InstanceMaterial | None = None
    context: SSL.Context | None = None
    generation: int = 0
    # Metrics: plain ints written by the refresher thread only, read by the metrics exporter.
    refresh_ok: int = 0
    refresh_failed: int = 0


class Refresher:
    """The one background thread that refreshes every instance's certificate (see module doc).

    ``loop`` is woken with ``call_soon_threadsafe`` after each publication. ``key_factory`` makes
    the process key on the refresher thread (default :func:`fastproxy.keys.generate_key`);
    ``context_factory`` builds a TLS context (default
    :func:`fastproxy.tlsctx.build_client_context`).
    ``clock`` (monotonic) drives the schedule and the rate limiter, ``wall`` (POSIX) is compared
    with expiries; ``rate``/``burst`` are the per-instance Admin API rate limit.
    """

    def __init__(
        self,
        loop: LoopWaker,
        fetcher: Fetcher,
        *,
        key_factory: KeyFactory | None = None,
        context_factory: ContextFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rate: float = RATE,
        burst: int = BURST,
        token_margin: float = TOKEN_REFRESH_MARGIN,
        token_min_recheck: float = TOKEN_MIN_RECHECK,
        token_retry: float = TOKEN_RETRY,
    ) -> None:
        self._loop = loop
        self._fetcher = fetcher
        self._key_factory = key_factory or _default_key_factory
        self._context_factory = context_factory or _default_context_factory
        self._clock = clock
        self.wall = wall
        self._rate = rate
        self._burst = burst
        self._token_margin = token_margin
        self._token_min_recheck = token_min_recheck
        self._token_retry = token_retry
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Instance]] = []
        self._seq = itertools.count()
        self._entries: dict[tuple[InstanceURI, bool, bool], _Instance] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Refresher thread only.
        self._key: RSAPrivateKey | None = None
        self._public_pem = ""

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread; it generates the key first, then works through the schedule."""
        if self._thread is not None:
            raise RuntimeError("the refresher was already started")
        self._thread = threading.Thread(target=self._run, name="fastproxy-refresher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait briefly for it (a fetch in flight is not interrupted)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(STOP_JOIN_TIMEOUT)

    def wait_first(self, timeout: float) -> dict[InstanceURI, Exception | None]:
        """Block until every instance had its first refresh (or ``timeout``); report each.

        For ``--run-connection-test``-style start-up checks, from the main thread before the loop
        runs. Lazy instances are asked for a refresh here. An instance still waiting at the
        deadline maps to a ``TimeoutError``; otherwise to its sources' first error, or None.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            for entry in self._entries.values():
                if entry.lazy and not entry.attempted:
                    self._request_locked(entry, full=False)
            while not all(e.attempted for e in self._entries.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            entries = list(self._entries.values())
        result: dict[InstanceURI, Exception | None] = {}
        for entry in entries:
            err: Exception | None
            if not entry.attempted:
                err = TimeoutError(
                    f"no connection info for instance {entry.uri.short} within {timeout:g} s"
                )
            else:
                err = next((e for s in entry.sources if (e := s.error()) is not None), None)
            if result.get(entry.uri) is None:
                result[entry.uri] = err
        return result

    def metrics_snapshot(self) -> dict[str, RefreshSnapshot]:
        """Certificate refresh counters and the current certificate's expiry per instance (short
        ``p.r.c.i`` name); any thread, no lock (int and reference reads, a dict copy)."""
        out: dict[str, RefreshSnapshot] = {}
        for entry in list(dict(self._entries).values()):
            name = entry.uri.short
            material = entry.material
            expires = material.expires_at if material is not None else None
            prev = out.get(name)
            if prev is not None:  # the same instance with and without the exchange, or lazy
                known = [e for e in (prev.expires_at, expires) if e is not None]
                expires = max(known) if known else None
                out[name] = RefreshSnapshot(
                    prev.successes + entry.refresh_ok, prev.failures + entry.refresh_failed, expires
                )
            else:
                out[name] = RefreshSnapshot(entry.refresh_ok, entry.refresh_failed, expires)
        return out

    # -- called by sources (any thread) ------------------------------------------------------------
    def _register(self, source: _SourceBase) -> _Instance:
        key = (source.uri, source.metadata_exchange, source._lazy)
        with self._cond:
            entry = self._entries.get(key)
            if entry is None:
                entry = _Instance(
                    uri=source.uri,
                    use_mdx=source.metadata_exchange,
                    lazy=source._lazy,
                    bucket=TokenBucket(self._rate, self._burst, self._clock),
                )
                self._entries[key] = entry
            if not entry.lazy:
                if entry.material is None:
                    # First refresh at registration. If one is running already, the new source
                    # is appended before that run publishes, so it is published too.
                    now = self._clock()
                    if entry.cert_due is None or entry.cert_due > now:
                        entry.cert_due = now
                else:
                    # The instance is known: publish its current material for this source too.
                    source._token_due = self._clock()
            # Appended after its fields are set: a run in progress may pick it up right away.
            entry.sources.append(source)
            if not entry.lazy:
                self._schedule_locked(entry)
        return entry

    def force(self, entry: _Instance) -> None:
        """Refresh ``entry`` as soon as the rate limiter allows. Thread-safe, never blocks long.

        A refresh already running counts (its result is at most seconds old), as in Go.
        """
        with self._cond:
            if entry.lazy:
                self._request_locked(entry, full=True)
                return
            if entry.running:
                # Its result is at most seconds old, as in Go; but if what it publishes is still
                # unusable (an expiry seen during the run), refresh again after it.
                entry.force_after_run = True
                return
            now = self._clock()
            if entry.cert_due is None or entry.cert_due > now:
                entry.cert_due = now
                self._schedule_locked(entry)

    def request(self, entry: _Instance, *, full: bool) -> None:
        """Lazy mode: refresh ``entry`` now (``full``: even if its certificate looks fine)."""
        with self._cond:
            self._request_locked(entry, full=full)

    def _request_locked(self, entry: _Instance, *, full: bool) -> None:
        if full:
            entry.force_full = True
            if entry.running:
                # A dial failed while a refresh runs: its result may predate the failure, so run
                # again after it (Go's next ConnectionInfo would refresh again too).
                entry.force_after_run = True
                return
        if entry.running or entry.cert_due is not None:
            return  # already queued or in progress: concurrent dials share one attempt
        entry.cert_due = self._clock()
        self._schedule_locked(entry)

    # -- schedule (under the lock) -----------------------------------------------------------------
    def _schedule_locked(self, entry: _Instance) -> None:
        """Push the entry's next due time; any older heap item for it becomes stale."""
        dues: list[float] = []
        if entry.cert_due is not None:
            due = entry.cert_due
            if not entry.lazy:
                due = max(due, self._clock() + entry.bucket.time_until_token())
            dues.append(due)
        for source in entry.sources:
            if source._token_due is not None:
                dues.append(source._token_due)
        if not dues:
            entry.heap_seq = -1
            return
        seq = next(self._seq)
        entry.heap_seq = seq
        heapq.heappush(self._heap, (min(dues), seq, entry))
        self._cond.notify_all()

    def _next_work_locked(self) -> tuple[_Instance, bool, list[_SourceBase]] | None:
        """Wait for the earliest due entry; return it with what to do, or None when stopping."""
        while not self._stopping:
            now = self._clock()
            if self._heap and self._heap[0][0] <= now:
                _, seq, entry = heapq.heappop(self._heap)
                if seq != entry.heap_seq or entry.running:
                    continue  # stale item, or rescheduled when the run finishes
                entry.heap_seq = -1
                if entry.lazy:
                    entry.cert_due = None
                    return entry, True, []  # what a lazy request needs is decided in _run_lazy
                due = entry.cert_due
                do_cert = due is not None and due <= now and entry.bucket.try_take()
                tokens = [
                    s for s in entry.sources if s._token_due is not None and s._token_due <= now
                ]
                if not do_cert and not tokens:
                    self._schedule_locked(entry)  # rate limited: come back when a token is due
                    continue
                return entry, do_cert, tokens
            timeout = self._heap[0][0] - now if self._heap else None
            self._cond.wait(timeout)
        return None

    # -- the thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._ensure_key()
        except Exception as exc:  # retried before every fetch; reported as each refresh's error
            log.error("generating the client key failed: %s", exc)
        while True:
            with self._cond:
                work = self._next_work_locked()
                if work is None:
                    return
                entry, do_cert, tokens = work
                entry.running = True
            try:
                if entry.lazy:
                    self._run_lazy(entry)
                elif do_cert:
                    self._refresh_cert(entry)
                else:
                    for source in tokens:
                        self._publish_source(entry, source)
            except Exception:  # never let a bug end the thread that keeps every cert fresh
                log.exception("refresh of %s crashed", entry.uri.short)
            finally:
                with self._cond:
                    entry.running = False
                    if entry.force_after_run:
                        entry.force_after_run = False
                        self._recheck_locked(entry)
                    self._schedule_locked(entry)
                    self._cond.notify_all()

    def _recheck_locked(self, entry: _Instance) -> None:
        """A force arrived during a run. Lazy: run again. Refresh-ahead: only if a published info
        is unusable (otherwise the run that just finished was the refresh, as in Go)."""
        if entry.lazy:
            entry.cert_due = self._clock()
            return
        now = self.wall()
        if any(s._state.info is not None and not s._state.valid_at(now) for s in entry.sources):
            entry.cert_due = self._clock()

    def _ensure_key(self) -> RSAPrivateKey:
        if self._key is None:
            key = self._key_factory()
            self._public_pem = _public_key_pem(key)
            self._key = key
        return self._key

    def _run_lazy(self, entry: _Instance) -> None:
        with self._cond:
            full = entry.force_full
            entry.force_full = False
        material = entry.material
        if full or material is None or self.wall() >= material.expires_at - REFRESH_BUFFER:
            self._refresh_cert(entry)
        else:
            for source in entry.sources:
                self._publish_source(entry, source)

    def _refresh_cert(self, entry: _Instance) -> None:
        """Fetch, build a new context, publish for every source; schedule the next run."""
        short = entry.uri.short
        try:
            try:
                key = self._ensure_key()
            except Exception as exc:
                raise _as_refresh_error(exc, "generating the client key", short) from exc
            material = self._fetcher.fetch(
                entry.uri, self._public_pem, use_metadata_exchange=entry.use_mdx
            )
            if material.expires_at <= self.wall():
                raise RefreshError(
                    f"refresh of instance {short} returned a certificate that has already expired"
                )
            try:
                context = self._context_factory(material.chain_pems, key, material.ca_cert_pem)
            except Exception as exc:
                raise _as_refresh_error(exc, "building the TLS context", short) from exc
        except Exception as exc:
            err = _as_refresh_error(exc, "refresh", short)
            log.warning("refresh of %s failed: %s", short, err)
            entry.refresh_failed += 1
            for source in entry.sources:
                old = source._state
                source._publish(_State(old.info, old.token_expires_at, err), self._loop)
            with self._cond:
                entry.attempted = True
                # Retry at once; the bucket turns a failure storm into one attempt per 1/rate s.
                entry.cert_due = None if entry.lazy else self._clock()
            return

        entry.material = material
        entry.context = context
        entry.generation = next_generation()
        entry.refresh_ok += 1
        delay = next_refresh_delay(self.wall(), material.expires_at)
        log.info(
            "refreshed %s: certificate generation %d, valid for %.0f s",
            short,
            entry.generation,
            material.expires_at - self.wall(),
        )
        for source in entry.sources:
            self._publish_source(entry, source)
        with self._cond:
            entry.attempted = True
            entry.cert_due = None if entry.lazy else self._clock() + delay

    def _publish_source(self, entry: _Instance, source: _SourceBase) -> None:
        """Publish ``entry``'s current material for ``source`` with a freshly fetched token."""
        material, context = entry.material, entry.context
        if material is None or context is None:
            source._token_due = None  # the first certificate refresh will publish it
            return
        old = source._state
        address = material.ip_addresses.get(source.ip_type)
        if not address:
            # A configuration problem, not a transient one: stored as the error, no retry storm
            # (the next scheduled refresh will notice if the instance gains the address).
            source._token_due = None
            err = ConfigError(
                f'instance does not have IP of type "{source.ip_type}" (instance {entry.uri.short})'
            )
            source._publish(_State(None, None, err), self._loop)
            return
        token, token_expiry = "", None
        if source.metadata_exchange and source._token_source is not None:
            try:
                token, token_expiry = source._token_source()
            except Exception as exc:
                err2 = _as_refresh_error(exc, "getting the exchange token", entry.uri.short)
                log.warning("token for %s: %s", entry.uri.short, err2)
                if not entry.lazy:
                    source._token_due = self._clock() + self._token_retry
                source._publish(_State(old.info, old.token_expires_at, err2), self._loop)
                return
        if token_expiry is None or entry.lazy:
            source._token_due = None
        else:
            wait = token_expiry - self._token_margin - self.wall()
            source._token_due = self._clock() + max(self._token_min_recheck, wait)
        info = DialInfo(
            instance=entry.uri.short,
            context=context,
            generation=entry.generation,
            expires_at=material.expires_at,
            address=address,
            port=source.port,
            metadata_exchange=source.metadata_exchange,
            auth_type=source.auth_type,
            exchange_token=token,
            user_agent=source.user_agent,
        )
        source._publish(_State(info, token_expiry, None), self._loop)
