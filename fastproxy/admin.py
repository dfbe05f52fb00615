# google-auth's functions carry no annotations, so strict mypy flags every call into it; the
# calls are allowed for this module only, and our own code stays fully typed.
# mypy: disallow-untyped-calls=False
"""The AlloyDB Admin API client: connection info and client certificates over REST/JSON.

One refresh of an instance is two RPCs (protocol.md §2), issued **concurrently** as both
connectors do, because a refresh's latency is what a client waits for on a cold start:

* ``GET  {endpoint}/{version}/{instance}/connectionInfo`` -> IP addresses, PSC name, instance UID;
* ``POST {endpoint}/{version}/{cluster}:generateClientCertificate`` -> a short-lived client
  certificate chain for our public key and the cluster CA the server certificate chains to.

API version: **v1beta** by default. It is the version the Python connectors use (REST up to 1.7,
gRPC since), it has both methods with the fields we need (``pscDnsName``, ``useMetadataExchange``),
and unlike ``v1alpha`` (the Go connector's choice) it is not an alpha surface. ``v1`` and
``v1alpha`` can be selected; the emulator serves all three identically.

Transport: ``requests`` through google-auth's ``AuthorizedSession``, which adds the bearer token
and refreshes expired credentials. It does *not* refresh-and-retry on HTTP 401 here
(``refresh_status_codes=()``): the Go client does not either, a static ``--token`` cannot be
refreshed anyway, and a rejected credential is reported as one clear error instead of a
confusing refresh failure. Each worker thread has its own session (``requests.Session`` is not
documented as thread-safe); credentials are refreshed once, up front, on the calling thread so
that the two concurrent calls do not race to refresh the same credentials.

Retries mirror the generated Go REST client's call options (protocol.md §2.6): only HTTP 503 is
retried, with exponential back-off starting at 1 s, multiplied by 1.3 per attempt and capped at
``max_retry_delay``, at most ``max_attempts`` attempts in all; every other failure is final, because
the refresher above us has its own schedule and keeps the last good certificate meanwhile. No
jitter: there is one refresher per process, so there is no herd to spread.

Everything that comes back is validated before it is trusted: JSON shape, IP literals, PEM that
parses, a leaf certificate for *our* public key and not yet expired, at least one address. Every
failure is an :class:`AdminAPIError` whose ``str`` is one line naming the instance. Tokens and keys
never appear in messages or logs.

Threads: ``fetch`` blocks; it is called from the refresher thread, never from the event loop.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import platform
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import google.auth.credentials
import google.auth.exceptions
import google.auth.transport.requests
import requests
from cryptography import x509

import fastproxy
from fastproxy.errors import ConfigError, FastproxyError
from fastproxy.instance_uri import InstanceURI
from fastproxy.keys import certificate_has_public_key
from fastproxy.tlsctx import load_certificates

__all__ = [
    "API_VERSIONS",
    "DEFAULT_API_VERSION",
    "DEFAULT_ENDPOINT",
    "AdminAPIError",
    "AdminClient",
    "ClientCertificate",
    "ConnectionInfo",
    "InstanceMaterial",
    "validate_endpoint",
]

log = logging.getLogger("fastproxy.admin")

DEFAULT_ENDPOINT: Final = "https://alloydb.googleapis.com"
DEFAULT_API_VERSION: Final = "v1beta"
API_VERSIONS: Final = ("v1", "v1beta", "v1alpha")

#: Back-off of the Go REST client's generated call options (protocol.md §2.6).
RETRY_INITIAL_DELAY_S: Final = 1.0
RETRY_MULTIPLIER: Final = 1.3
#: The only status retried: UNAVAILABLE is the one Google documents as "safe to retry".
RETRYABLE_STATUS: Final = 503
#: The API's own messages are short; anything longer is noise in a one-line error.
MAX_MESSAGE_CHARS: Final = 300

_METHOD_INFO: Final = "connectionInfo"
_METHOD_CERT: Final = "generateClientCertificate"


class AdminAPIError(FastproxyError):
    """A refresh failed at the Admin API: HTTP error, unreachable endpoint or a bad response.

    ``status`` is the HTTP status (0 when the failure is not an HTTP error status: network,
    credentials, malformed or invalid response); ``instance`` is the instance's short name;
    ``api_message`` is the API's own ``error.message`` (may be empty); ``method`` names the RPC.
    ``str(exc)`` is one human-readable line.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        instance: str = "",
        api_message: str = "",
        method: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.instance = instance
        self.api_message = api_message
        self.method = method


@dataclass(frozen=True)
class ConnectionInfo:
    """The validated ``connectionInfo`` answer."""

    ip_addresses: dict[str, str]  # "PRIVATE" / "PUBLIC" / "PSC", only those present
    instance_uid: str


@dataclass(frozen=True)
class ClientCertificate:
    """The validated ``generateClientCertificate`` answer."""

    chain_pems: list[str]  # [leaf, intermediate, root], each ending with "\n"
    ca_cert_pem: str
    expires_at: float  # leaf NotAfter, POSIX seconds


@dataclass(frozen=True)
class InstanceMaterial:
    """Everything one refresh yields for one instance: where to dial and what to present.

    ``ip_addresses`` maps ``PRIVATE``/``PUBLIC``/``PSC`` to an address, only for those the API
    returned non-empty; the PSC DNS name has its trailing dot stripped (it is used as the TLS
    server name, and SAN matching wants no dot). ``chain_pems`` is ``[leaf, intermediate,
    root]``; ``ca_cert_pem`` is the only trust anchor for the server; ``expires_at`` is the leaf's
    NotAfter in POSIX seconds.
    """

    uri: InstanceURI
    ip_addresses: dict[str, str]
    instance_uid: str
    chain_pems: list[str]
    ca_cert_pem: str
    expires_at: float


def validate_endpoint(endpoint: str) -> str:
    """Check an Admin API base URL and return it without trailing ``/``.

    Only ``http`` (for the emulator on loopback) and ``https`` are meaningful; a query or fragment
    would be mangled by appending paths, so they are refused too. Raises ``ConfigError``.
    """
    parts = urllib.parse.urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"invalid Admin API endpoint {endpoint!r}: expected an http:// or https:// URL "
            "such as https://alloydb.googleapis.com"
        )
    if parts.query or parts.fragment:
        raise ConfigError(
            f"invalid Admin API endpoint {endpoint!r}: must not have a query or fragment"
        )
    return urllib.parse.urlunsplit(parts).rstrip("/")


def _one_line(text: str) -> str:
    """Collapse whitespace and control characters so a message fits one log line."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    cleaned = " ".join(cleaned.split())
    if len(cleaned) > MAX_MESSAGE_CHARS:
        cleaned = cleaned[: MAX_MESSAGE_CHARS - 3] + "..."
    return cleaned


def _api_message(resp: requests.Response) -> str:
    """The API's ``error.message`` from a Google JSON error body, else a short text fallback."""
    try:
        payload = resp.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return _one_line(err["message"])
        if isinstance(err, str):
            return _one_line(err)
    text = _one_line(resp.text) if resp.text else ""
    return text or _one_line(resp.reason or "") or "no error message"


def _network_reason(exc: BaseException) -> str:
    """The innermost OS-level reason ("Connection refused") inside a requests exception.

    requests wraps urllib3 wraps socket errors, and the outer ``str`` is a paragraph with object
    addresses; the user needs the errno text.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.strerror:
            return str(cur.strerror)
        for nxt in (getattr(cur, "reason", None), cur.__cause__, cur.__context__, *cur.args):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return type(exc).__name__


def _field(body: Mapping[str, Any], camel: str, snake: str) -> Any:
    """A response field by its JSON name or its proto name (protojson emits either)."""
    return body[camel] if camel in body else body.get(snake)


def _pem_text(pem: str) -> str:
    """PEM with a trailing newline, so chains can be concatenated safely (protocol.md §2.3)."""
    return pem if pem.endswith("\n") else pem + "\n"


class AdminClient:
    """A blocking Admin API client for the refresher thread.

    Owns a two-thread pool (the two RPCs of one refresh run in parallel) and one
    ``AuthorizedSession`` per pool thread. ``close`` releases both; the client is unusable after.
    """

    def __init__(
        self,
        credentials: google.auth.credentials.Credentials,
        *,
        endpoint: str = DEFAULT_ENDPOINT,
        api_version: str = DEFAULT_API_VERSION,
        user_agent: str = "",
        quota_project: str | None = None,
        timeout: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        max_retry_delay: float = 60.0,
        max_attempts: int = 5,
    ) -> None:
        if api_version not in API_VERSIONS:
            raise ConfigError(
                f"unsupported Admin API version {api_version!r}; "
                f"expected one of {', '.join(API_VERSIONS)}"
            )
        if not timeout > 0:
            raise ConfigError(f"Admin API timeout must be positive, got {timeout!r}")
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be at least 1, got {max_attempts!r}")
        self._endpoint = validate_endpoint(endpoint)
        self._base = f"{self._endpoint}/{api_version}"
        self._timeout = timeout
        self._sleep = sleep
        self._max_retry_delay = max_retry_delay
        self._max_attempts = max_attempts

        # An explicit quota project wins over the one in the credentials. google-auth's apply()
        # writes x-goog-user-project from the credentials, after our headers, so the override
        # must go into the credentials when they support it.
        if quota_project and isinstance(
            credentials, google.auth.credentials.CredentialsWithQuotaProject
        ):
            credentials = credentials.with_quota_project(quota_project)
        self._credentials = credentials
        project = quota_project or getattr(credentials, "quota_project_id", None)

        version = fastproxy.__version__
        ua = f"fastproxy/{version}"
        extras = " ".join(user_agent.split())
        self._headers: dict[str, str] = {
            "User-Agent": f"{ua} {extras}" if extras else ua,
            "x-goog-api-client": f"gl-python/{platform.python_version()} fastproxy/{version}",
            "Content-Type": "application/json",
        }
        if project:
            self._headers["x-goog-user-project"] = str(project)

        self._auth_lock = threading.Lock()
        self._sessions_lock = threading.Lock()
        self._sessions: list[google.auth.transport.requests.AuthorizedSession] = []
        self._local = threading.local()
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fastproxy-admin")

    @property
    def endpoint(self) -> str:
        """The validated base URL, without trailing ``/``."""
        return self._endpoint

    # --- public API ------------------------------------------------------------------------
    def fetch(
        self,
        uri: InstanceURI,
        public_key_pem: str,
        *,
        use_metadata_exchange: bool = True,
        cert_duration_s: int = 3600,
    ) -> InstanceMaterial:
        """Run one refresh: both RPCs concurrently, validated, combined.

        Blocks up to about ``timeout`` per attempt. Raises :class:`AdminAPIError`; if both calls
        fail, the ``connectionInfo`` error is raised (it is usually the more telling one: a
        missing instance, a missing permission).
        """
        self._check_open(uri)
        self._ensure_token(uri)
        info_f: Future[ConnectionInfo] = self._pool.submit(self.get_connection_info, uri)
        cert_f: Future[ClientCertificate] = self._pool.submit(
            self.generate_client_certificate,
            uri,
            public_key_pem,
            use_metadata_exchange=use_metadata_exchange,
            cert_duration_s=cert_duration_s,
        )
        # Wait for both before raising: no call outlives the fetch that started it.
        info_exc = info_f.exception()
        cert_exc = cert_f.exception()
        for exc in (info_exc, cert_exc):
            if exc is not None:
                raise exc
        info = info_f.result()
        cert = cert_f.result()
        return InstanceMaterial(
            uri=uri,
            ip_addresses=info.ip_addresses,
            instance_uid=info.instance_uid,
            chain_pems=cert.chain_pems,
            ca_cert_pem=cert.ca_cert_pem,
            expires_at=cert.expires_at,
        )

    def get_connection_info(self, uri: InstanceURI) -> ConnectionInfo:
        """``GET .../connectionInfo`` with retries, validated. Raises :class:`AdminAPIError`."""
        self._check_open(uri)
        body = self._call("GET", f"{self._base}/{uri.uri}/connectionInfo", uri.uri, uri, None)
        return self._parse_connection_info(uri, body)

    def generate_client_certificate(
        self,
        uri: InstanceURI,
        public_key_pem: str,
        *,
        use_metadata_exchange: bool = True,
        cert_duration_s: int = 3600,
    ) -> ClientCertificate:
        """``POST ...:generateClientCertificate`` for ``public_key_pem``, validated.

        The certificate is cluster-scoped (protocol.md §1.3). ``useMetadataExchange`` is omitted
        when false, as proto3 JSON omits default values.
        """
        self._check_open(uri)
        if cert_duration_s <= 0:
            raise ConfigError(f"certificate duration must be positive, got {cert_duration_s!r}")
        parent = uri.cluster_parent
        request: dict[str, Any] = {
            "parent": parent,
            "publicKey": public_key_pem,
            "certDuration": f"{int(cert_duration_s)}s",
        }
        if use_metadata_exchange:
            request["useMetadataExchange"] = True
        url = f"{self._base}/{parent}:generateClientCertificate"
        body = self._call("POST", url, parent, uri, request)
        return self._parse_certificate(uri, body, public_key_pem)

    def close(self) -> None:
        """Stop the worker threads and close the HTTP sessions. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport -------------------------------------------------------------------------
    def _check_open(self, uri: InstanceURI) -> None:
        if self._closed:
            raise AdminAPIError("the Admin API client is closed", instance=uri.short)

    def _session(self) -> google.auth.transport.requests.AuthorizedSession:
        session: google.auth.transport.requests.AuthorizedSession | None = getattr(
            self._local, "session", None
        )
        if session is None:
            session = google.auth.transport.requests.AuthorizedSession(
                self._credentials, refresh_status_codes=()
            )
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _ensure_token(self, uri: InstanceURI) -> None:
        """Refresh the credentials once, here, before the two calls fan out.

        Without this both worker threads would find an expired token and refresh concurrently.
        """
        with self._auth_lock:
            if self._credentials.valid:
                return
            try:
                self._credentials.refresh(google.auth.transport.requests.Request())
            except google.auth.exceptions.GoogleAuthError as exc:
                raise self._token_error(uri, "", exc) from exc

    def _token_error(
        self, uri: InstanceURI, method: str, exc: BaseException
    ) -> AdminAPIError:
        # google-auth messages describe the failing step; they do not contain the token.
        return AdminAPIError(
            f"could not obtain an access token for the Admin API (instance {uri.short}): "
            f"{_one_line(str(exc)) or type(exc).__name__}",
            instance=uri.short,
            method=method,
        )

    def _call(
        self,
        http_method: str,
        url: str,
        parent: str,
        uri: InstanceURI,
        request: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """One RPC with the 503 retry policy; returns the decoded JSON object."""
        method = _METHOD_CERT if request is not None else _METHOD_INFO
        headers = dict(self._headers)
        headers["x-goog-request-params"] = "parent=" + urllib.parse.quote(parent, safe="")
        data = json.dumps(request).encode("utf-8") if request is not None else None
        attempt = 1
        while True:
            try:
                resp = self._session().request(
                    http_method, url, data=data, headers=headers, timeout=self._timeout
                )
            except google.auth.exceptions.GoogleAuthError as exc:
                raise self._token_error(uri, method, exc) from exc
            except requests.Timeout as exc:
                raise AdminAPIError(
                    f"the Admin API at {self._endpoint} did not answer {method} for instance "
                    f"{uri.short} within {self._timeout:g} s",
                    instance=uri.short,
                    method=method,
                ) from exc
            except requests.RequestException as exc:
                raise AdminAPIError(
                    f"cannot reach the Admin API at {self._endpoint} (instance {uri.short}, "
                    f"{method}): {_network_reason(exc)}",
                    instance=uri.short,
                    method=method,
                ) from exc
            with resp:
                status = resp.status_code
                if status == RETRYABLE_STATUS and attempt < self._max_attempts:
                    delay = min(
                        RETRY_INITIAL_DELAY_S * RETRY_MULTIPLIER ** (attempt - 1),
                        self._max_retry_delay,
                    )
                    log.info(
                        "Admin API %s for %s answered HTTP 503; retry %d in %.1f s",
                        method, uri.short, attempt, delay,
                    )
                    attempt += 1
                    self._sleep(delay)
                    continue
                if not 200 <= status < 300:
                    raise self._http_error(uri, method, status, _api_message(resp), attempt)
                try:
                    payload = resp.json()
                except ValueError as exc:
                    raise AdminAPIError(
                        f"malformed response from the Admin API for instance {uri.short} "
                        f"({method}): the body is not valid JSON",
                        instance=uri.short,
                        method=method,
                    ) from exc
            if not isinstance(payload, dict):
                raise self._invalid(uri, method, "the body is not a JSON object")
            return payload

    def _http_error(
        self, uri: InstanceURI, method: str, status: int, message: str, attempts: int
    ) -> AdminAPIError:
        short = uri.short
        if status == 401:
            text = f"credentials were rejected by the Admin API (instance {short}): {message}"
        elif status == 403:
            text = f"caller lacks permission to use instance {short}: {message}"
        elif status == 404:
            text = f"instance not found: {short}: {message}"
        elif status == RETRYABLE_STATUS:
            text = (
                f"the Admin API is unavailable for instance {short} ({method}, "
                f"{attempts} attempts): {message}"
            )
        else:
            text = f"Admin API {method} failed for instance {short}: {message}"
        return AdminAPIError(
            f"{text} (HTTP {status})",
            status=status,
            instance=short,
            api_message=message,
            method=method,
        )

    @staticmethod
    def _invalid(uri: InstanceURI, method: str, why: str) -> AdminAPIError:
        return AdminAPIError(
            f"invalid response from the Admin API for instance {uri.short} ({method}): {why}",
            instance=uri.short,
            method=method,
        )

    # --- validation ------------------------------------------------------------------------
    def _parse_connection_info(self, uri: InstanceURI, body: dict[str, Any]) -> ConnectionInfo:
        addresses: dict[str, str] = {}
        for ip_type, camel, snake in (
            ("PRIVATE", "ipAddress", "ip_address"),
            ("PUBLIC", "publicIpAddress", "public_ip_address"),
            ("PSC", "pscDnsName", "psc_dns_name"),
        ):
            value = _field(body, camel, snake)
            if value is None or value == "":
                continue  # proto3: absent and empty mean the same
            if not isinstance(value, str):
                raise self._invalid(uri, _METHOD_INFO, f"{camel} is not a string")
            if ip_type == "PSC":
                value = value.rstrip(".")
                if not value:
                    continue
            else:
                # The data plane dials these without DNS (no lookups on the loop thread), so
                # anything but an IP literal is an error here rather than a stall there.
                try:
                    ipaddress.ip_address(value)
                except ValueError:
                    raise self._invalid(
                        uri, _METHOD_INFO, f"{camel} {value!r} is not an IP address"
                    ) from None
            addresses[ip_type] = value
        uid = _field(body, "instanceUid", "instance_uid")
        if uid is None:
            uid = ""
        if not isinstance(uid, str):
            raise self._invalid(uri, _METHOD_INFO, "instanceUid is not a string")
        if not addresses:
            raise AdminAPIError(
                f"instance {uri.short} has no supported IP addresses (the Admin API returned "
                "no private IP, public IP or PSC DNS name)",
                instance=uri.short,
                method=_METHOD_INFO,
            )
        return ConnectionInfo(ip_addresses=addresses, instance_uid=uid)

    def _parse_certificate(
        self, uri: InstanceURI, body: dict[str, Any], public_key_pem: str
    ) -> ClientCertificate:
        chain = _field(body, "pemCertificateChain", "pem_certificate_chain")
        if not isinstance(chain, list) or not chain:
            raise self._invalid(uri, _METHOD_CERT, "pemCertificateChain is missing or empty")
        if not all(isinstance(p, str) and p.strip() for p in chain):
            raise self._invalid(uri, _METHOD_CERT, "pemCertificateChain holds a non-PEM entry")
        ca = _field(body, "caCert", "ca_cert")
        if not isinstance(ca, str) or not ca.strip():
            raise self._invalid(uri, _METHOD_CERT, "caCert is missing or empty")
        chain_pems = [_pem_text(p) for p in chain]
        try:
            certs = [load_certificates([p])[0] for p in chain_pems]
        except ValueError:
            raise self._invalid(
                uri, _METHOD_CERT, "the client certificate chain is not valid PEM"
            ) from None
        try:
            load_certificates([ca])
        except ValueError:
            raise self._invalid(
                uri, _METHOD_CERT, "caCert is not a valid PEM certificate"
            ) from None
        leaf: x509.Certificate = certs[0]
        try:
            ours = certificate_has_public_key(leaf, public_key_pem)
        except ValueError:
            raise AdminAPIError(
                f"the public key submitted for instance {uri.short} is not a PEM public key",
                instance=uri.short,
                method=_METHOD_CERT,
            ) from None
        if not ours:
            raise self._invalid(
                uri, _METHOD_CERT, "the client certificate is for a different public key"
            )
        expires_at = leaf.not_valid_after_utc.timestamp()
        if expires_at <= time.time():
            when = datetime.fromtimestamp(expires_at, UTC).isoformat()
            raise self._invalid(
                uri, _METHOD_CERT, f"the client certificate has already expired (at {when})"
            )
        return ClientCertificate(
            chain_pems=chain_pems, ca_cert_pem=_pem_text(ca), expires_at=expires_at
        )
