"""Connection-info sources: what a listener needs to dial its instance, published atomically.

A source hands the loop one immutable :class:`DialInfo` (SSL context of the current certificate
generation, address, exchange parameters) through a single reference read. Whoever keeps it fresh
(the refresher thread, or nobody for a static file) replaces the whole object; a connection copies
the reference when it starts and so keeps the context it started with, whatever is published after.

The loop thread never waits on a source: when nothing is published yet, a connection registers a
callback with :meth:`ConnectionInfoSource.when_ready` and stays pending; the source calls back on
the loop thread (through ``call_soon_threadsafe``) once there is something to use, or an error.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from OpenSSL import SSL

from fastproxy.errors import ConfigError
from fastproxy.instance_uri import InstanceURI
from fastproxy.mdx import AuthType
from fastproxy.tlsctx import build_client_context, load_private_key_pem

SERVER_PORT = 5433  # every AlloyDB client dials 5433; it is not configurable (protocol §2.7)
USER_AGENT = "fastproxy"


class IPType:
    PRIVATE = "PRIVATE"
    PUBLIC = "PUBLIC"
    PSC = "PSC"


@dataclass(frozen=True)
class DialInfo:
    """Everything one dial needs, immutable. ``context`` is never mutated once published."""

    instance: str  # short name p.r.c.i for logs
    context: SSL.Context
    generation: int
    expires_at: float  # client certificate NotAfter, POSIX seconds
    address: str  # IP literal or PSC DNS name actually dialled; the SAN checked against it
    port: int
    metadata_exchange: bool
    auth_type: AuthType
    exchange_token: str  # raw OAuth2 access token for the exchange (never logged)
    user_agent: str


class ConnectionInfoSource(Protocol):
    """The interface between a listener's connections and whatever keeps certificates fresh."""

    name: str

    def current(self) -> DialInfo | None:
        """The latest published info, or None while none is available (loop thread; cheap)."""

    def error(self) -> Exception | None:
        """Why nothing is available, once a first attempt failed."""

    def when_ready(self, callback: Callable[[], None]) -> None:
        """Arrange for ``callback`` to run on the loop thread once ``current()`` or ``error()``
        changes. Called from the loop thread only."""

    def dial_failed(self, reason: str) -> None:
        """A TCP or TLS failure: the certificate or address may be stale (force a refresh)."""


def _parse_ip_type(public_ip: bool, psc: bool) -> str:
    # The Auth Proxy applies public-ip then psc, so psc wins when both are set (protocol §6).
    if psc:
        return IPType.PSC
    if public_ip:
        return IPType.PUBLIC
    return IPType.PRIVATE


class StaticSource:
    """Connection info read once from a ``--static-connection-info`` file; never refreshed.

    The format is the Go Auth Proxy's (protocol §5.6): ``publicKey``, ``privateKey`` and one object
    per instance URI with ``ipAddress``, ``publicIpAddress``, ``pscInstanceConfig.pscDnsName``,
    ``pemCertificateChain`` and ``caCert``. Development and benchmarking only: the file holds a
    private key.
    """

    def __init__(self, info: DialInfo, wall: Callable[[], float] = time.time) -> None:
        self.name = info.instance
        self._info = info
        self._wall = wall

    def current(self) -> DialInfo | None:
        # An expired certificate would only be refused by the server, after the handshake
        # (protocol §3.4); saying so here gives the user the real cause. Nothing can renew it.
        return self._info if self._wall() < self._info.expires_at else None

    def error(self) -> Exception | None:
        if self._wall() < self._info.expires_at:
            return None
        return ConfigError(
            "the client certificate from --static-connection-info expired at "
            + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._info.expires_at))
            + " and static connection info is never refreshed"
        )

    def when_ready(self, callback: Callable[[], None]) -> None:
        callback()

    def dial_failed(self, reason: str) -> None:
        """Nothing to refresh: the file is the only truth."""


def load_static_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read static connection info {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"static connection info {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"static connection info {path}: expected a JSON object")
    for key in ("privateKey", "publicKey"):
        if not isinstance(data.get(key), str):
            raise ConfigError(f"static connection info {path}: missing {key!r}")
    return data


_generation_lock = threading.Lock()
_generation = 0


def next_generation() -> int:
    """Process-wide certificate generation numbers, so logs can tell contexts apart."""
    global _generation
    with _generation_lock:
        _generation += 1
        return _generation


def static_dial_info(
    data: dict[str, Any],
    uri: InstanceURI,
    *,
    public_ip: bool = False,
    psc: bool = False,
    auto_iam_authn: bool = False,
    exchange_token: str = "",
    metadata_exchange: bool = True,
    user_agent: str = USER_AGENT,
    port: int = SERVER_PORT,
) -> DialInfo:
    """Build the :class:`DialInfo` for one instance of a static connection-info document."""
    entry = data.get(uri.uri)
    if not isinstance(entry, dict):
        raise ConfigError(f"static connection info has no entry for instance {uri.uri!r}")
    ip_type = _parse_ip_type(public_ip, psc)
    if ip_type == IPType.PSC:
        psc_cfg = entry.get("pscInstanceConfig") or {}
        address = psc_cfg.get("pscDnsName") if isinstance(psc_cfg, dict) else None
    elif ip_type == IPType.PUBLIC:
        address = entry.get("publicIpAddress")
    else:
        address = entry.get("ipAddress")
    if isinstance(address, str):
        address = address.rstrip(".")  # a PSC name's trailing dot; "." alone is no address
    if not isinstance(address, str) or not address:
        raise ConfigError(f'instance does not have IP of type "{ip_type}" (instance {uri.short})')
    chain = entry.get("pemCertificateChain")
    ca = entry.get("caCert")
    if not (isinstance(chain, list) and chain and all(isinstance(c, str) for c in chain)):
        raise ConfigError(f"static connection info for {uri.short}: bad pemCertificateChain")
    if not isinstance(ca, str):
        raise ConfigError(f"static connection info for {uri.short}: missing caCert")
    try:
        key = load_private_key_pem(str(data["privateKey"]).encode())
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        context = build_client_context(chain, key, ca)
    except (ValueError, TypeError, SSL.Error, UnsupportedAlgorithm) as exc:
        # UnsupportedAlgorithm: a PEM private key of a type cryptography does not know (an
        # unknown PKCS#8 algorithm identifier) is not a ValueError.
        raise ConfigError(f"static connection info for {uri.short}: {exc}") from exc
    if metadata_exchange and not exchange_token:
        raise ConfigError(
            "the metadata exchange needs an OAuth2 token: pass --token (or --login-token)"
        )
    return DialInfo(
        instance=uri.short,
        context=context,
        generation=next_generation(),
        expires_at=leaf.not_valid_after_utc.timestamp(),
        address=address,
        port=port,
        metadata_exchange=metadata_exchange,
        auth_type=AuthType.AUTO_IAM if auto_iam_authn else AuthType.DB_NATIVE,
        exchange_token=exchange_token,
        user_agent=user_agent,
    )
