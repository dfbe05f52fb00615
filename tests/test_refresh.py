"""fastproxy.refresh: the §5.2 schedule, the rate limiter, and the refresher thread with a fake
Admin API, real certificates and a real event loop running in its own thread."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from fastproxy.admin import AdminAPIError, InstanceMaterial
from fastproxy.errors import ConfigError
from fastproxy.instance_uri import InstanceURI
from fastproxy.loop import Loop
from fastproxy.mdx import AuthType
from fastproxy.refresh import (
    LazySource,
    Refresher,
    RefreshError,
    RefreshingSource,
    TokenBucket,
    next_refresh_delay,
)
from fastproxy.source import SERVER_PORT, DialInfo
from fastproxy.tlsctx import build_client_context

URI = InstanceURI.parse("projects/p/locations/r/clusters/c/instances/i")
HOUR = 3600.0
T0 = 1_800_000_000.0  # fake wall-clock start (POSIX seconds)


# --- the pure rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remaining", "delay"),
    [
        (HOUR - 1, HOUR - 1 - 240),  # a 1 h cert fetched just now: ~55m59s
        (HOUR, 1800.0),  # exactly 1 h -> half (Go test)
        (2 * HOUR, HOUR),
        (24 * HOUR, 12 * HOUR),
        (300.0, 60.0),  # 5 min -> 1 min
        (180.0, 0.0),  # 3 min -> now
        (240.0, 0.0),  # exactly the buffer -> now
        (-10.0, 0.0),  # already expired -> now
    ],
)
def test_next_refresh_delay_worked_values(remaining: float, delay: float) -> None:
    assert next_refresh_delay(T0, T0 + remaining) == pytest.approx(delay)


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_token_bucket_burst_then_rate() -> None:
    clock = FakeClock(100.0)
    bucket = TokenBucket(rate=1 / 30, burst=2, clock=clock)
    assert bucket.time_until_token() == 0.0
    assert bucket.try_take()
    assert bucket.try_take()
    assert not bucket.try_take()
    assert bucket.time_until_token() == pytest.approx(30.0)
    clock.now += 10
    assert not bucket.try_take()
    assert bucket.time_until_token() == pytest.approx(20.0)
    clock.now += 20
    assert bucket.try_take()
    assert not bucket.try_take()


def test_token_bucket_caps_at_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=2, clock=clock)
    assert bucket.try_take() and bucket.try_take()
    clock.now += 1000  # a long idle period refills only up to the burst
    assert bucket.try_take() and bucket.try_take()
    assert not bucket.try_take()
    assert bucket.time_until_token() == pytest.approx(1.0)


def test_token_bucket_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0)
    with pytest.raises(ValueError):
        TokenBucket(burst=0)


# --- real certificates for a fake Admin API ------------------------------------------------------


@dataclass
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    pem: str


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@pytest.fixture(scope="module")
def ca() -> CA:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("test CA"))
        .issuer_name(_name("test CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return CA(key, cert, cert.public_bytes(serialization.Encoding.PEM).decode())


@pytest.fixture(scope="module")
def process_key() -> rsa.RSAPrivateKey:
    """One RSA-2048 key for the module (generating one per test would cost most of the time)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _leaf_chain(ca: CA, public_key_pem: str) -> list[str]:
    public_key = serialization.load_pem_public_key(public_key_pem.encode())
    assert isinstance(public_key, rsa.RSAPublicKey)
    now = dt.datetime.now(dt.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("client"))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(ca.key, hashes.SHA256())
    )
    return [leaf.public_bytes(serialization.Encoding.PEM).decode(), ca.pem]


Outcome = Callable[[], Exception | None]


@dataclass
class FakeFetcher:
    """Answers like ``AdminClient.fetch``; records calls and the threads they ran on.

    ``outcomes`` is consumed one per call (an exception is raised); when empty, ``default`` is
    used. ``gate`` (if set) blocks each call until it is set.
    """

    ca: CA
    wall: FakeClock
    ips: dict[str, str] = field(default_factory=lambda: {"PRIVATE": "10.0.0.5"})
    lifetime: float = HOUR
    outcomes: list[Exception | None] = field(default_factory=list)
    default: Exception | None = None
    gate: threading.Event | None = None
    calls: list[tuple[InstanceURI, bool]] = field(default_factory=list)
    threads: set[int] = field(default_factory=set)
    _chains: dict[str, list[str]] = field(default_factory=dict)

    def fetch(
        self, uri: InstanceURI, public_key_pem: str, *, use_metadata_exchange: bool = True
    ) -> InstanceMaterial:
        self.threads.add(threading.get_ident())
        self.calls.append((uri, use_metadata_exchange))
        if self.gate is not None:
            self.gate.wait(5)
        outcome = self.outcomes.pop(0) if self.outcomes else self.default
        if outcome is not None:
            raise outcome
        chain = self._chains.get(public_key_pem)
        if chain is None:
            chain = self._chains[public_key_pem] = _leaf_chain(self.ca, public_key_pem)
        return InstanceMaterial(
            uri=uri,
            ip_addresses=dict(self.ips),
            instance_uid="uid-1",
            chain_pems=chain,
            ca_cert_pem=self.ca.pem,
            expires_at=self.wall() + self.lifetime,
        )


def api_error(text: str = "boom") -> AdminAPIError:
    return AdminAPIError(f"connectionInfo failed for instance p.r.c.i: {text}", status=503)


class Tokens:
    """A TokenSource: hands out ``tok-1``, ``tok-2`` ... with expiries from ``lifetimes``."""

    def __init__(self, wall: FakeClock, lifetimes: Sequence[float | None] = (None,)) -> None:
        self.wall = wall
        self.lifetimes = list(lifetimes)
        self.count = 0
        self.threads: set[int] = set()

    def __call__(self) -> tuple[str, float | None]:
        self.threads.add(threading.get_ident())
        self.count += 1
        life = self.lifetimes[min(self.count - 1, len(self.lifetimes) - 1)]
        return f"tok-{self.count}", None if life is None else self.wall() + life


@dataclass
class Harness:
    loop: Loop
    loop_thread: threading.Thread
    wall: FakeClock
    fetcher: FakeFetcher
    key_threads: set[int]
    ctx_threads: set[int]
    refreshers: list[Refresher] = field(default_factory=list)

    def refresher(self, **kw: object) -> Refresher:
        r = Refresher(
            self.loop,
            self.fetcher,
            key_factory=kw.pop("key_factory"),  # type: ignore[arg-type]
            context_factory=self._ctx,
            wall=self.wall,
            **kw,  # type: ignore[arg-type]
        )
        self.refreshers.append(r)
        return r

    def _ctx(self, chain: Sequence[str], key: rsa.RSAPrivateKey, ca_pem: str) -> SSL.Context:
        self.ctx_threads.add(threading.get_ident())
        return build_client_context(chain, key, ca_pem)

    def on_loop(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on the loop thread and return its result (the only way in)."""
        done = threading.Event()
        box: list[object] = []

        def run() -> None:
            box.append(fn())
            done.set()

        self.loop.call_soon_threadsafe(run)
        assert done.wait(5), "the loop did not run the call"
        return box[0]


@pytest.fixture
def harness(ca: CA, process_key: rsa.RSAPrivateKey) -> Iterator[Harness]:
    loop = Loop()
    thread = threading.Thread(target=loop.run, name="test-loop", daemon=True)
    thread.start()
    wall = FakeClock(T0)
    h = Harness(loop, thread, wall, FakeFetcher(ca, wall), set(), set())
    yield h
    for r in h.refreshers:
        r.stop()
    loop.stop()
    thread.join(5)
    loop.close()


def key_factory_for(h: Harness, key: rsa.RSAPrivateKey) -> Callable[[], rsa.RSAPrivateKey]:
    def make() -> rsa.RSAPrivateKey:
        h.key_threads.add(threading.get_ident())
        return key

    return make


def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.002)


def _source(
    r: Refresher,
    *,
    ip_type: str = "PRIVATE",
    tokens: Tokens | None = None,
    lazy: bool = False,
    auto_iam: bool = False,
) -> RefreshingSource | LazySource:
    cls = LazySource if lazy else RefreshingSource
    return cls(
        r,
        URI,
        ip_type,
        auto_iam=auto_iam,
        metadata_exchange=True,
        user_agent="fastproxy/test",
        token_source=tokens or Tokens(FakeClock(T0)),
    )


def _published(src: RefreshingSource | LazySource) -> DialInfo:
    """Wait for a publication *and* for the run that made it to finish: a refresh-ahead force
    that arrives while a run is in progress is absorbed by that run (Go's behaviour too), which
    would make the next step of a test racy."""
    wait_for(lambda: src.current() is not None)
    wait_for(lambda: not src._entry.running)
    info = src.current()
    assert info is not None
    return info


# --- refresh-ahead ----------------------------------------------------------------------------


def test_first_refresh_publishes_and_threads_are_kept_apart(
    harness: Harness, process_key: rsa.RSAPrivateKey
) -> None:
    h = harness
    r = h.refresher(key_factory=key_factory_for(h, process_key))
    tokens = Tokens(h.wall)
    src = _source(r, tokens=tokens, auto_iam=True)
    ran_on: list[int] = []
    seen: list[DialInfo | None] = []

    def callback() -> None:
        ran_on.append(threading.get_ident())
        seen.append(src.current())

    # Registered from the loop thread before the refresher even starts: the connection's path.
    assert h.on_loop(lambda: src.current()) is None
    h.on_loop(lambda: src.when_ready(callback))
    r.start()
    wait_for(lambda: bool(ran_on))

    assert ran_on == [h.loop_thread.ident]
    info = seen[0]
    assert info is not None
    assert info.instance == "p.r.c.i"
    assert info.address == "10.0.0.5"
    assert info.port == SERVER_PORT
    assert info.auth_type is AuthType.AUTO_IAM
    assert info.metadata_exchange
    assert info.exchange_token == "tok-1"
    assert info.user_agent == "fastproxy/test"
    assert info.expires_at == T0 + HOUR
    assert isinstance(info.context, SSL.Context)
    assert info.generation > 0
    assert src.error() is None
    assert h.fetcher.calls == [(URI, True)]

    # Key, fetch, context and token all ran on the one refresher thread, never on the loop.
    worker = h.fetcher.threads
    assert len(worker) == 1
    assert h.key_threads == worker == h.ctx_threads == tokens.threads
    assert h.loop_thread.ident not in worker
    assert threading.get_ident() not in worker

    t0 = time.monotonic()
    r.stop()
    assert time.monotonic() - t0 < 2.0


def test_default_key_factory_uses_fastproxy_keys(harness: Harness) -> None:
    h = harness
    r = Refresher(h.loop, h.fetcher, wall=h.wall)  # real keys.generate_key and tlsctx
    h.refreshers.append(r)
    src = _source(r)
    r.start()
    info = _published(src)
    assert info.address == "10.0.0.5"


def test_failure_keeps_last_good_until_expiry_then_error(
    harness: Harness, process_key: rsa.RSAPrivateKey
) -> None:
    h = harness
    h.fetcher.outcomes = [None]
    h.fetcher.default = api_error("unavailable")
    r = h.refresher(key_factory=key_factory_for(h, process_key))
    src = _source(r)
    r.start()
    good = _published(src)

    src.dial_failed("connect")  # forced refresh -> fails
    wait_for(lambda: len(h.fetcher.calls) == 2)
    wait_for(lambda: src._state.error is not None)
    assert src.current() is good  # still valid: keep serving it
    assert src.error() is None

    h.wall.now = good.expires_at + 1  # the certificate really expired
    assert src.current() is None
    err = src.error()
    assert isinstance(err, AdminAPIError)
    assert "unavailable" in str(err)


def test_failures_are_rate_limited(harness: Harness, process_key: rsa.RSAPrivateKey) -> None:
    h = harness
    h.fetcher.default = api_error()
    r = h.refresher(key_factory=key_factory_for(h, process_key))  # default 1/30 s, burst 2
    src = _source(r)
    r.start()
    wait_for(lambda: len(h.fetcher.calls) == 2)  # the first attempt and one immediate retry
    for _ in range(5):
        src.dial_failed("handshake")  # forced refreshes go through the same bucket
    time.sleep(0.3)
    assert len(h.fetcher.calls) == 2
    assert src.current() is None
    assert isinstance(src.error(), AdminAPIError)


def test_rate_limited_retries_resume_at_the_rate(
    harness: Harness, process_key: rsa.RSAPrivateKey
) -> None:
    h = harness
    h.fetcher.outcomes = [api_error(), api_error(), api_error()]
    r = h.refresher(key_factory=key_factory_for(h, process_key), rate=10.0, burst=2)
    src = _source(r)
    t0 = time.monotonic()
    r.start()
    _published(src)
    # burst of 2, then one token per 0.1 s: the 4th call cannot come before ~0.2 s
    assert len(h.fetcher.calls) == 4
    assert time.monotonic() - t0 >= 0.15
    assert src.error() is None


def test_forced_refresh_on_dial_failed_builds_a_new_context(
    harness: Harness, process_key: rsa.RSAPrivateKey
) -> None:
    h = harness
    r = h.refresher(key_factory=key_factory_for(h, process_key))
    src = _source(r)
    r.start()
    first = _published(src)
    h.on_loop(lambda: src.dial_failed("handshake"))
    wait_for(lambda: src.current() is not first)
    second = src.current()
    assert second is not None
    assert second.generation > first.generation
    assert second.context is not first.context
    assert len(h.fetcher.calls) == 2


def test_expired_certificate_forces_refresh_and_waits(
    harness: Harness, process_key: rsa.RSAPrivateKey
) -> None:
    h = harness
    r = h.refresher(key_factory=key_factory_for(h, process_key))
    src = _source(r)
    r.start()
    first = _published(src)
    h.fetcher.gate = threading.Event()  # hold the next fetch so the PENDING phase is observable
    h.wall.now = first.expires_at + 10  # the laptop slept through the refresh

    ready = threading.Event()

    def start_connection() -> tuple[DialInfo | None, Exception | None]:
        result = (src.current(), src.error())
        src.when_ready(ready.set)
        return result

    assert h.on_loop(start_connection) == (None, None)  # wait in PENDING, no error
    wait_for(lambda: len(h.fetcher.calls) == 2)
    h.fetcher.gate.set()
    assert ready.wait(5)
    fresh = src.current()
    assert fresh is not None and fresh.generation > first.generation
    assert fresh.expires_at == h.wall.now + HOUR


def test_missing_ip_type_is_a_config_error_without_retries(
    harness: Harness, process_key: rsa.RSAPrivateKey
) -> None:
    h = harness
    r = h.refresher(key_factory=key_factory_for(h, process_key))
    src = _source(r, ip_type="PUBLIC")
    r.start()
    wait_for(lambda: src.error() is not None)
    err = src.error()
    assert isinstance(err, ConfigError)
    assert str(err) == 'instance does not have IP of type "PUBLIC" (instance p.r.c.i)'
    assert src.current() is None
    time.sleep(0.2)
    assert len(h.fetcher.calls) == 1


def test_expired_material_is_rejected(harness: Harness, process_key: rsa.RSAPrivateKey) -> None:
    h = harness
    h.fetcher.lifetime = -1.0
    r = h.refresher(key_factory=key_factory_for(h, process_key))
    src = _source(r)
    r.start()
    wait_for(lambda: src.error() is not None)
    assert isinstance(src.error(), RefreshError)
    assert "already expired" in str(src.error())


def test_context_errors_are_wrapped(harness: Harness, ca: CA) -> None:
    h = harness
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    r = h.refresher(key_factory=lambda: other)
    # The fetcher normally signs for the key it is given; break the match: sign for another key.

    def mismatched(
        uri: InstanceURI, public_key_pem: str, *, use_metadata_exchange: bool = True
    ) -> InstanceMaterial:
        return InstanceMaterial(
            uri=uri,
            ip_addresses={"PRIVATE": "10.0.0.5"},
            instance_uid="u",
            chain_pems=_leaf_chain(ca, _pub(rsa.generate_private_key(65537, 2048))),
            ca_cert_pem=ca.pem,
            expires_at=h.wall() + HOUR,
        )

    h.fetcher.fetch = mismatched  # type: ignore[method-assign]
    src = _source(r)
    r.start()
    wait_for(lambda: src.error() is not None)
    assert isinstance(src.error(), RefreshError)
    assert str(src.error()).startswith("building the TLS context failed for instance p.r.c.i")


def _pub(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def test_key_generation_failure_is_reported_and_retried(
    harness: Harness, process_key: rsa.RSAPrivateKey
) -> None:
    h = harness
    attempts: list[int] = []

    def flaky() -> rsa.RSAPrivateKey:
        attempts.append(threading.get_ident())
        if len(attempts) == 1:
            raise OSError("no entropy")
        return process_key

    r = h.refresher(key_factory=flaky, rate=50.0)
    src = _source(r)
    r.start()
    _published(src)
    assert len(attempts) == 2
    assert h.loop_thread.ident not in attempts


def test_second_source_for_a_known_instance_is_published_without_a_fetch(
    harness: Harness, process_key: rsa.RSAPrivateKey
) -> None:
    h = harness
    r = h.refresher(key_factory=key_factory_for(h, process_key))
    first = _source(r)
    r.start()
    a = _published(first)
    second = _source(r)
    b = _published(second)
    assert b.context is a.context and b.generation == a.generation
    assert len(h.fetcher.calls) == 1


def test_token_is_republished_before_it_expires(
    harness: Harness, process_key: rsa.RSAPrivateKey
) -> None:
    h = harness
    # tok-1 enters the 5-minute margin 50 ms after it is issued; tok-2 lives an hour.
    tokens = Tokens(h.wall, [300.05, HOUR])
    r = h.refresher(key_factory=key_factory_for(h, process_key), token_min_recheck=0.01)
    src = _source(r, tokens=tokens)
    r.start()
    first = _published(src)
    assert first.exchange_token == "tok-1"
    wait_for(lambda: (i := src.current()) is not None and i.exchange_token == "tok-2")
    second = src.current()
    assert second is not None
    # Same certificate, so same context and generation; only the token changed.
    assert second.context is first.context
    assert second.generation == first.generation
    assert len(h.fetcher.calls) == 1
    assert h.loop_thread.ident not in tokens.threads
    time.sleep(0.1)
    assert tokens.count == 2  # tok-2 is far from expiry: no busy re-fetching


def test_expired_token_hides_info_and_forces_refresh(
    harness: Harness, process_key: rsa.RSAPrivateKey
) -> None:
    h = harness
    tokens = Tokens(h.wall, [600.0, HOUR])
    r = h.refresher(key_factory=key_factory_for(h, process_key))
    src = _source(r, tokens=tokens)
    r.start()
    first = _published(src)
    h.wall.now += 601  # token expired (cert still valid), e.g. after a suspend
    assert src.current() is None
    wait_for(lambda: (i := src.current()) is not None and i.exchange_token == "tok-2")
    assert first.exchange_token == "tok-1"


def test_token_failure_keeps_old_info_and_retries(
    harness: Harness, process_key: rsa.RSAPrivateKey
) -> None:
    h = harness
    calls: list[int] = []

    def flaky_tokens() -> tuple[str, float | None]:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("metadata server down")
        return f"tok-{len(calls)}", h.wall() + 300.05

    r = h.refresher(
        key_factory=key_factory_for(h, process_key), token_min_recheck=0.01, token_retry=0.05
    )
    src = RefreshingSource(r, URI, "PRIVATE", token_source=flaky_tokens)
    r.start()
    first = _published(src)
    wait_for(lambda: len(calls) >= 2)
    assert src.current() is first  # the failed token fetch changed nothing the loop uses
    wait_for(lambda: (i := src.current()) is not None and i.exchange_token == "tok-3")


def test_metadata_exchange_needs_a_token_source(
    harness: Harness, process_key: rsa.RSAPrivateKey
) -> None:
    r = harness.refresher(key_factory=key_factory_for(harness, process_key))
    with pytest.raises(ConfigError):
        RefreshingSource(r, URI, "PRIVATE", metadata_exchange=True, token_source=None)
    src = RefreshingSource(r, URI, "PSC", metadata_exchange=False)
    harness.fetcher.ips = {"PSC": "x.psc.example"}
    r.start()
    info = _published(src)
    assert info.exchange_token == "" and not info.metadata_exchange
    assert info.address == "x.psc.example"
    assert harness.fetcher.calls == [(URI, False)]


def test_wait_first(harness: Harness, process_key: rsa.RSAPrivateKey) -> None:
    h = harness
    r = h.refresher(key_factory=key_factory_for(h, process_key))
    _source(r)
    r.start()
    assert r.wait_first(5) == {URI: None}


def test_wait_first_reports_errors_and_timeouts(
    harness: Harness, process_key: rsa.RSAPrivateKey
) -> None:
    h = harness
    h.fetcher.default = api_error("denied")
    r = h.refresher(key_factory=key_factory_for(h, process_key))
    _source(r)
    r.start()
    result = r.wait_first(5)
    assert isinstance(result[URI], AdminAPIError)

    h2_gate = threading.Event()
    h.fetcher.gate = h2_gate
    h.fetcher.default = None
    r2 = h.refresher(key_factory=key_factory_for(h, process_key))
    _source(r2)
    r2.start()
    t0 = time.monotonic()
    result = r2.wait_first(0.2)
    assert 0.15 < time.monotonic() - t0 < 2
    assert isinstance(result[URI], TimeoutError)
    h2_gate.set()


def test_stop_is_quick_when_idle(harness: Harness, process_key: rsa.RSAPrivateKey) -> None:
    r = harness.refresher(key_factory=key_factory_for(harness, process_key))
    src = _source(r)
    r.start()
    _published(src)
    t0 = time.monotonic()
    r.stop()
    assert time.monotonic() - t0 < 0.5
    assert r._thread is not None and not r._thread.is_alive()


# --- lazy -------------------------------------------------------------------------------------


def test_lazy_refreshes_on_demand_only(harness: Harness, process_key: rsa.RSAPrivateKey) -> None:
    h = harness
    r = h.refresher(key_factory=key_factory_for(h, process_key))
    src = _source(r, lazy=True)
    r.start()
    time.sleep(0.1)
    assert h.fetcher.calls == []  # no background work until a dial asks

    ready = threading.Event()

    def dial() -> DialInfo | None:
        info = src.current()
        if info is None:
            src.when_ready(ready.set)
        return info

    assert h.on_loop(dial) is None
    assert ready.wait(5)
    first = src.current()
    assert first is not None
    assert len(h.fetcher.calls) == 1
    assert h.loop_thread.ident not in h.fetcher.threads

    for _ in range(3):
        assert src.current() is first  # fresh: no more calls
    time.sleep(0.05)
    assert len(h.fetcher.calls) == 1

    h.wall.now = first.expires_at - 200  # within 4 minutes: still served, refreshed behind
    assert src.current() is first
    wait_for(lambda: src.current() is not first)
    second = src.current()
    assert second is not None and second.generation > first.generation
    assert len(h.fetcher.calls) == 2


def test_lazy_dial_failed_refreshes_on_next_dial_without_rate_limit(
    harness: Harness, process_key: rsa.RSAPrivateKey
) -> None:
    h = harness
    r = h.refresher(key_factory=key_factory_for(h, process_key))
    src = _source(r, lazy=True)
    r.start()
    src.current()
    info = _published(src)
    for n in range(2, 6):  # more than the burst of 2, at once: lazy mode has no rate limiter
        src.dial_failed("connect")
        assert src.current() is info  # still valid: served while the refresh runs
        wait_for(lambda old=info: src.current() is not old)  # type: ignore[misc]
        info = _published(src)
        assert len(h.fetcher.calls) == n


def test_lazy_error_with_no_valid_info(harness: Harness, process_key: rsa.RSAPrivateKey) -> None:
    h = harness
    h.fetcher.outcomes = [api_error("first")]
    r = h.refresher(key_factory=key_factory_for(h, process_key))
    src = _source(r, lazy=True)
    r.start()
    assert src.current() is None
    wait_for(lambda: src.error() is not None)
    assert "first" in str(src.error())
    # The next dial asks again (every dial retries, as in Go) and succeeds.
    src.current()
    _published(src)
    assert src.error() is None
    assert len(h.fetcher.calls) == 2


def test_lazy_wait_first_triggers_a_refresh(
    harness: Harness, process_key: rsa.RSAPrivateKey
) -> None:
    h = harness
    r = h.refresher(key_factory=key_factory_for(h, process_key))
    src = _source(r, lazy=True)
    r.start()
    assert r.wait_first(5) == {URI: None}
    assert src.current() is not None


def test_lazy_dial_failure_during_a_run_refreshes_again(
    harness: Harness, process_key: rsa.RSAPrivateKey
) -> None:
    h = harness
    r = h.refresher(key_factory=key_factory_for(h, process_key))
    src = _source(r, lazy=True)
    r.start()
    src.current()
    first = _published(src)
    h.fetcher.gate = threading.Event()
    src.dial_failed("connect")
    src.current()  # asks for a full refresh, which now blocks in the fetcher
    wait_for(lambda: len(h.fetcher.calls) == 2)
    src.dial_failed("handshake")  # a failure seen while that run is in progress
    src.current()
    h.fetcher.gate.set()
    wait_for(lambda: len(h.fetcher.calls) == 3)  # the run's result may predate it: once more
    info = _published(src)
    assert info.generation > first.generation
    time.sleep(0.05)
    assert len(h.fetcher.calls) == 3
