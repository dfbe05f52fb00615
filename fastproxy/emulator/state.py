"""Shared, thread-safe state of one emulator process.

The Admin API runs on HTTP worker threads, the server side on an asyncio loop; both read the same
instances, tokens and fault switches. Everything mutable sits behind one lock so a fault toggled
through ``/_emulator/`` takes effect for the very next request or connection.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# The connectors' pattern (protocol.md §1.2), anchored at both ends as the Python connector does:
# the emulator is the strict side.
INSTANCE_URI_RE = re.compile(
    r"projects/(?P<project>[^:/]+(?::[^:/]+)?)/locations/(?P<region>[^:/]+)"
    r"/clusters/(?P<cluster>[^:/]+)/instances/(?P<instance>[^:/]+)"
)

DEFAULT_INSTANCE_URI = (
    "projects/demo-project/locations/us-central1/clusters/demo-cluster/instances/demo-primary"
)

# AlloyDB documents certDuration as a hint between 1 h and 24 h.
MIN_CERT_DURATION_S = 3600.0
MAX_CERT_DURATION_S = 24 * 3600.0
DEFAULT_CERT_DURATION_S = 3600.0
# How many Admin API requests /_emulator/requests remembers (oldest dropped first): enough for a
# test's worth of refreshes, small enough that a long-running emulator cannot grow without bound.
REQUESTS_LOG_MAX = 1000


class InstanceURIError(ValueError):
    """An instance URI that does not have the five-segment AlloyDB shape."""


@dataclass(frozen=True)
class InstanceName:
    project: str
    region: str
    cluster: str
    instance: str

    @classmethod
    def parse(cls, uri: str) -> InstanceName:
        m = INSTANCE_URI_RE.fullmatch(uri)
        if m is None:
            raise InstanceURIError(
                "invalid instance URI, expected projects/<PROJECT>/locations/<REGION>/clusters/"
                f"<CLUSTER>/instances/<INSTANCE> (instance URI = {uri!r})"
            )
        return cls(m["project"], m["region"], m["cluster"], m["instance"])

    @property
    def uri(self) -> str:
        return f"{self.cluster_parent}/instances/{self.instance}"

    @property
    def cluster_parent(self) -> str:
        """The resource name generateClientCertificate is scoped to (one CA per cluster)."""
        return f"projects/{self.project}/locations/{self.region}/clusters/{self.cluster}"

    @property
    def short(self) -> str:
        return f"{self.project}.{self.region}.{self.cluster}.{self.instance}"


@dataclass
class Instance:
    name: InstanceName
    instance_uid: str
    ip_address: str | None
    public_ip_address: str | None
    psc_dns_name: str | None  # as the API returns it: with a trailing dot

    def addresses(self) -> list[str]:
        """The IP literals the server side listens on (port 5433 each)."""
        return [a for a in (self.ip_address, self.public_ip_address) if a]


@dataclass(frozen=True)
class IssuedCert:
    """What the emulator remembers about each client certificate it signed."""

    serial: int
    cluster_parent: str
    use_metadata_exchange: bool
    not_after: float  # POSIX seconds
    principal: str  # who asked for it


@dataclass(frozen=True)
class AdminFailure:
    status: int
    message: str


@dataclass
class Counters:
    admin_requests: int = 0
    admin_errors: int = 0
    certificates_issued: int = 0
    connections_accepted: int = 0
    connections_active: int = 0
    handshakes_failed: int = 0
    mdx_ok: int = 0
    mdx_refused: int = 0


@dataclass
class Backend:
    """Where the server side forwards after the exchange.

    ``kind`` is ``postgres`` (a throwaway server this emulator started), ``external`` (an existing
    PostgreSQL at host:port) or ``echo``. ``iam_password`` is the secret the emulator answers the
    backend's cleartext password request with for AUTO_IAM logins (postgres kind only).
    """

    kind: str
    host: str | None = None
    port: int | None = None
    iam_password: str | None = None


@dataclass
class EmulatorState:
    instances: dict[str, Instance]  # by canonical URI
    tokens: dict[str, str]  # bearer token -> IAM principal
    backend: Backend
    cert_lifetime_s: float | None = None  # None: honour certDuration, clamped
    forbidden: set[tuple[str, str]] = field(default_factory=set)  # (principal, cluster_parent)
    counters: Counters = field(default_factory=Counters)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    # fault switches (set through /_emulator/ on the admin port)
    admin_failures: deque[AdminFailure] = field(default_factory=deque)
    admin_latency_s: float = 0.0
    mdx_refusal: str | None = None  # when set, every exchange is answered ERROR with this text
    drop_after_handshake: bool = False
    one_byte_records: bool = False
    issued: dict[int, IssuedCert] = field(default_factory=dict)
    # the next N Admin API calls answer 200 with a body that is not JSON
    malformed_json_next: int = 0
    # every Admin API request as seen on the wire (Authorization redacted), for tests to inspect
    requests_log: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=REQUESTS_LOG_MAX)
    )

    # --- lookups -------------------------------------------------------------------------
    def principal_for(self, token: str) -> str | None:
        with self.lock:
            return self.tokens.get(token)

    def is_forbidden(self, principal: str, cluster_parent: str) -> bool:
        with self.lock:
            return (principal, cluster_parent) in self.forbidden

    def cluster_exists(self, cluster_parent: str) -> bool:
        with self.lock:
            return any(i.name.cluster_parent == cluster_parent for i in self.instances.values())

    def record_issued(self, cert: IssuedCert) -> None:
        with self.lock:
            self.issued[cert.serial] = cert
            self.counters.certificates_issued += 1

    def lookup_issued(self, serial: int) -> IssuedCert | None:
        with self.lock:
            return self.issued.get(serial)

    # --- faults --------------------------------------------------------------------------
    def fail_next(self, count: int, status: int, message: str) -> None:
        with self.lock:
            for _ in range(count):
                self.admin_failures.append(AdminFailure(status, message))

    def take_admin_failure(self) -> AdminFailure | None:
        with self.lock:
            return self.admin_failures.popleft() if self.admin_failures else None

    def take_malformed_json(self) -> bool:
        """Consume one pending malformed-response fault, if any."""
        with self.lock:
            if self.malformed_json_next > 0:
                self.malformed_json_next -= 1
                return True
            return False

    def reset_faults(self) -> None:
        with self.lock:
            self.admin_failures.clear()
            self.malformed_json_next = 0
            self.admin_latency_s = 0.0
            self.mdx_refusal = None
            self.drop_after_handshake = False
            self.one_byte_records = False


def iam_db_user(principal: str) -> str:
    """The database user AlloyDB derives from an IAM principal.

    Users log in with their full e-mail; service accounts without the ``.gserviceaccount.com``
    suffix (AlloyDB IAM database authentication docs).
    """
    suffix = ".gserviceaccount.com"
    return principal[: -len(suffix)] if principal.endswith(suffix) else principal
