"""Counters kept as plain ints on the loop thread; other threads read snapshots.

Ownership: every counter here is written by the loop thread only (the refresher keeps its own, see
:meth:`fastproxy.refresh.Refresher.metrics_snapshot`). Other threads (the health/metrics server)
only *read*: reading an int attribute is atomic under the GIL, and so is copying a dict or a list
(``dict(d)``, ``list(l)`` run in C without releasing the GIL and without calling back into Python
for str/tuple keys). A reader may therefore see counters from slightly different instants but
never a torn value. Nothing on the hot path calls into ``prometheus_client``: the exporter
(:mod:`fastproxy.health`) turns a :class:`MetricsSnapshot` into metric families when scraped.

Histograms are a fixed list of bucket upper bounds and a list of int counts, one per bucket plus
an overflow bucket; :meth:`Histogram.observe` is one ``bisect`` and one list increment.

What is counted where:

* accepted connections, per instance: when the listener hands a client to the proxy;
* refused: the proxy never accepts-and-closes, it stops accepting and lets clients wait in the
  kernel's backlog. "Refused" therefore counts the times accepting was *paused*, by reason:
  ``max_connections`` (the ``--max-connections`` gate) and ``out_of_fds`` (EMFILE/ENFILE);
* failed, per instance and reason: sessions that ended before bytes could flow --
  ``connect`` (TCP connect refused/unreachable/reset), ``dns`` (PSC name), ``socket`` (no
  descriptor for the upstream socket), ``tls`` (handshake or certificate refused),
  ``exchange`` (metadata exchange refused or broken), ``timeout`` (dial, handshake or exchange
  deadline) and ``no_connection_info`` (no certificate published in time, or the source's error);
* bytes per instance: added when a connection closes (:meth:`Stats.closed`); the proxy's
  :meth:`~fastproxy.proxy.Proxy.metrics_snapshot` adds the live counts of open connections;
* dial latency (dial start -- after connection info was available -- to session established:
  connect, TLS and metadata exchange) and TLS handshake latency (TCP connected to handshake done),
  per instance, successful dials only.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastproxy.connection import Connection

#: Dial latency buckets (seconds): a local dial takes milliseconds, a cross-region one ~100 ms,
#: a dial waiting for the 30 s deadline lands in the overflow bucket.
DIAL_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
#: TLS handshake latency buckets (seconds).
TLS_BUCKETS: tuple[float, ...] = DIAL_BUCKETS
#: Loop iteration busy time buckets (seconds): from select returning to the end of the iteration.
LOOP_BUCKETS: tuple[float, ...] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)

#: Reasons for ``refused`` (see the module docstring).
REFUSED_MAX_CONNECTIONS = "max_connections"
REFUSED_OUT_OF_FDS = "out_of_fds"


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A copy of a histogram: ``counts[i]`` observations ``<= bounds[i]`` (and above the previous
    bound); ``counts[-1]`` is the overflow bucket (``+Inf``). Not cumulative."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float

    @property
    def observations(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        out: list[int] = []
        running = 0
        for c in self.counts:
            running += c
            out.append(running)
        return out


class Histogram:
    """Fixed buckets, int counts; written by one thread, copied by others."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        b = tuple(float(x) for x in bounds)
        if list(b) != sorted(set(b)):
            raise ValueError("bucket bounds must be strictly increasing")
        self.bounds = b
        self.counts = [0] * (len(b) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, i.e. Prometheus' inclusive "le".
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self.counts), self.total)


class InstanceCounters:
    """Per-instance counters (keyed by the short ``p.r.c.i`` name); loop thread only."""

    __slots__ = (
        "accepted",
        "bytes_down",
        "bytes_up",
        "dial_latency",
        "failed",
        "name",
        "tls_latency",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.accepted = 0
        self.bytes_up = 0  # closed connections only
        self.bytes_down = 0
        self.failed: dict[str, int] = {}
        self.dial_latency = Histogram(DIAL_BUCKETS)
        self.tls_latency = Histogram(TLS_BUCKETS)


class Stats:
    #: The scalar counters, in :meth:`snapshot` (the keys of ``Proxy.stats()``).
    SCALARS: tuple[str, ...] = (
        "accept_paused",
        "accepted",
        "active",
        "bytes_down",
        "bytes_up",
        "closed_error",
        "closed_ok",
        "connected_total",
        "dial_failures",
        "emfile_events",
        "max_active",
    )

    __slots__ = (*SCALARS, "instances")

    def __init__(self) -> None:
        self.accepted = 0
        self.active = 0
        self.max_active = 0
        self.connected_total = 0  # sessions that reached SPLICING
        self.closed_ok = 0
        self.closed_error = 0
        self.dial_failures = 0  # connect, DNS, TLS or timeout failures before SPLICING
        self.bytes_up = 0
        self.bytes_down = 0
        self.emfile_events = 0  # times a listener paused for lack of descriptors
        self.accept_paused = 0  # times a listener paused, for descriptors or the gate
        self.instances: dict[str, InstanceCounters] = {}

    def instance(self, name: str) -> InstanceCounters:
        """The counters of instance ``name``, created on first use. Loop thread only."""
        counters = self.instances.get(name)
        if counters is None:
            counters = self.instances[name] = InstanceCounters(name)
        return counters

    def opened(self, counters: InstanceCounters | None = None) -> None:
        self.accepted += 1
        self.active += 1
        if self.active > self.max_active:
            self.max_active = self.active
        if counters is not None:
            counters.accepted += 1

    def connected(self, conn: Connection) -> None:
        self.connected_total += 1

    def failed(self, counters: InstanceCounters, reason: str, *, dial: bool) -> None:
        """A session ended before splicing. ``dial``: a connect/TLS/timeout failure (also counted
        in ``dial_failures``, whose meaning predates the per-reason counters)."""
        if dial:
            self.dial_failures += 1
        failed = counters.failed
        failed[reason] = failed.get(reason, 0) + 1

    def closed(self, conn: Connection, error: bool) -> None:
        self.active -= 1
        up, down = conn.bytes_up, conn.bytes_down
        self.bytes_up += up
        self.bytes_down += down
        counters = conn.counters
        counters.bytes_up += up
        counters.bytes_down += down
        if error:
            self.closed_error += 1
        else:
            self.closed_ok += 1

    def refused(self) -> dict[str, int]:
        """Accept pauses by reason (every pause is counted in ``accept_paused``, the descriptor
        ones also in ``emfile_events``)."""
        fds = self.emfile_events
        return {
            REFUSED_MAX_CONNECTIONS: max(0, self.accept_paused - fds),
            REFUSED_OUT_OF_FDS: fds,
        }

    def snapshot(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.SCALARS}


@dataclass(frozen=True)
class InstanceSnapshot:
    accepted: int = 0
    bytes_up: int = 0  # client -> instance
    bytes_down: int = 0  # instance -> client
    failed: Mapping[str, int] = field(default_factory=dict)
    dial_latency: HistogramSnapshot = field(
        default_factory=lambda: Histogram(DIAL_BUCKETS).snapshot()
    )
    tls_latency: HistogramSnapshot = field(
        default_factory=lambda: Histogram(TLS_BUCKETS).snapshot()
    )


@dataclass(frozen=True)
class RefreshSnapshot:
    """Certificate refreshes of one instance (refresher thread's counters)."""

    successes: int = 0
    failures: int = 0
    expires_at: float | None = None  # POSIX seconds of the current certificate's NotAfter


@dataclass(frozen=True)
class MetricsSnapshot:
    """Everything ``/metrics`` shows about the loop, copied at one moment (roughly)."""

    worker: int = 0
    active: int = 0
    closed_ok: int = 0
    closed_error: int = 0
    refused: Mapping[str, int] = field(default_factory=dict)
    instances: Mapping[str, InstanceSnapshot] = field(default_factory=dict)
    loop_latency: HistogramSnapshot = field(
        default_factory=lambda: Histogram(LOOP_BUCKETS).snapshot()
    )
    heartbeat_age: float | None = None  # seconds since the loop's last iteration; None: not running
    pool_in_use: int = 0
    pool_capacity: int = 0


def instance_snapshots(
    stats: Stats, live: Callable[[], Mapping[str, tuple[int, int]]] | None = None
) -> dict[str, InstanceSnapshot]:
    """Copy the per-instance counters (any thread).

    ``live`` returns ``(bytes_up, bytes_down)`` of the connections still open, per instance; it is
    called *after* the closed-connection totals were read, so a connection closing meanwhile is
    missed by both (an undercount for one scrape) rather than counted twice.
    """
    base: list[tuple[str, InstanceCounters, int, int]] = [
        (name, c, c.bytes_up, c.bytes_down) for name, c in dict(stats.instances).items()
    ]
    extra = live() if live is not None else {}
    out: dict[str, InstanceSnapshot] = {}
    for name, c, up, down in base:
        live_up, live_down = extra.get(name, (0, 0))
        out[name] = InstanceSnapshot(
            accepted=c.accepted,
            bytes_up=up + live_up,
            bytes_down=down + live_down,
            failed=dict(c.failed),
            dial_latency=c.dial_latency.snapshot(),
            tls_latency=c.tls_latency.snapshot(),
        )
    return out
