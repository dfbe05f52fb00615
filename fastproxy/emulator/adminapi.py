"""The emulator's fake AlloyDB Admin API: REST/JSON over plain HTTP on loopback.

Two RPCs (protocol.md §2.2, §2.3), reachable under ``/v1/``, ``/v1beta/`` and ``/v1alpha/``:

* ``GET  /{v}/projects/{p}/locations/{r}/clusters/{c}/instances/{i}/connectionInfo``
* ``POST /{v}/projects/{p}/locations/{r}/clusters/{c}:generateClientCertificate``

plus fault-injection endpoints under ``/_emulator/`` (no auth, JSON in and out) that flip the
switches in ``EmulatorState``.

It is deliberately stricter than Google's own test fakes (§7.3): bearer tokens are checked
(401 unknown, 403 forbidden), resources must exist (404), the body is parsed by a real JSON parser
and validated (400), and every response — errors included — is Google-style JSON with
``Content-Type: application/json``, because the old Python connector refuses anything else
(§10). HTTP/1.1 keep-alive with an explicit Content-Length on every response, and a thread per
connection, since clients issue both RPCs concurrently on separate connections (§2.1).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import socket
import socketserver
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from fastproxy.emulator.pki import PKI, PKIError
from fastproxy.emulator.state import (
    DEFAULT_CERT_DURATION_S,
    MAX_CERT_DURATION_S,
    MIN_CERT_DURATION_S,
    EmulatorState,
    InstanceName,
    IssuedCert,
)

log = logging.getLogger("fastproxy.emulator.admin")

API_VERSIONS = ("v1", "v1beta", "v1alpha")
# Bodies are a few hundred bytes (a PEM public key); anything this large is a mistake.
MAX_BODY_BYTES = 1 << 20
# Idle keep-alive connections are closed after this long so worker threads do not pile up.
HANDLER_TIMEOUT_S = 120.0
# What a "malformed response" fault sends: a 200 whose body is cut off mid-object.
MALFORMED_BODY = b'{"pemCertificateChain": ["-----BEGIN CERTIFICATE-----\\nMII'

# google.rpc.Code names by HTTP status (the mapping in google/rpc/code.proto).
GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",  # no google.rpc.Code maps to 405; the method is not served here
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    412: "FAILED_PRECONDITION",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_VERSION = r"(?:v1|v1beta|v1alpha)"
# Segments exclude "/" (unlike the connectors' [^:]) so that one URL has one meaning; the project
# may carry one ":" (domain-scoped projects), the other segments none (§1.2, §7.3 #1).
_PROJECT = r"(?P<project>[^/:]+(?::[^/:]+)?)"
_SEG = r"[^/:]+"
_CONNECTION_INFO_RE = re.compile(
    rf"/{_VERSION}/projects/{_PROJECT}/locations/(?P<region>{_SEG})"
    rf"/clusters/(?P<cluster>{_SEG})/instances/(?P<instance>{_SEG})/connectionInfo"
)
_GENERATE_RE = re.compile(
    rf"/{_VERSION}/projects/{_PROJECT}/locations/(?P<region>{_SEG})"
    rf"/clusters/(?P<cluster>{_SEG}):generateClientCertificate"
)
_CLUSTER_PARENT_RE = re.compile(
    rf"projects/{_PROJECT}/locations/(?P<region>{_SEG})/clusters/(?P<cluster>{_SEG})"
)
# google.protobuf.Duration in JSON: seconds with up to nine fractional digits and an "s".
_DURATION_RE = re.compile(r"(-)?(\d+)(\.\d{1,9})?s")


class ApiError(Exception):
    """An error answered as Google JSON: ``{"error": {"code", "message", "status"}}``."""

    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


def google_status(code: int) -> str:
    return GOOGLE_STATUS.get(code, "UNKNOWN")


def error_body(code: int, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": google_status(code)}}


def parse_duration(value: object) -> float:
    """Parse a protobuf Duration in its JSON form (``"3600s"``, ``"3600.5s"``)."""
    if not isinstance(value, str):
        raise ApiError(400, f'certDuration must be a string like "3600s", got {value!r}')
    m = _DURATION_RE.fullmatch(value)
    if m is None:
        raise ApiError(400, f'invalid certDuration {value!r}: expected e.g. "3600s"')
    if m[1]:
        raise ApiError(400, f"invalid certDuration {value!r}: must not be negative")
    seconds = float(m[2] + (m[3] or ""))
    if not math.isfinite(seconds):
        raise ApiError(400, f"invalid certDuration {value!r}")
    return seconds


def _field(body: dict[str, Any], camel: str, snake: str) -> Any:
    """Read a request field by its JSON name or its proto name (protojson accepts both)."""
    return body[camel] if camel in body else body.get(snake)


class AdminServer(ThreadingHTTPServer):
    """The HTTP server; carries the emulator state and PKI for its handlers."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 overflows when many clients refresh at once, and a
    # dropped SYN costs the client a 1 s retransmit.
    request_queue_size = 128
    state: EmulatorState
    pki: PKI

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can hang
        # for seconds without network. The name is only used for CGI; skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-response is routine; do not spray tracebacks on stderr.
        log.debug("admin API: error serving %s", client_address, exc_info=True)


class AdminServer6(AdminServer):
    address_family = socket.AF_INET6


class AdminHandler(BaseHTTPRequestHandler):
    """One HTTP/1.1 connection; ``_dispatch`` handles each request on it."""

    server: AdminServer
    protocol_version = "HTTP/1.1"
    server_version = "fastproxy-emulator-admin/1"
    sys_version = ""
    timeout = HANDLER_TIMEOUT_S
    # Headers and body leave in one segment (buffered writer, flushed by handle_one_request) and
    # without Nagle: otherwise a header write followed by a body write meets the client's
    # delayed ACK and every response takes ~40 ms.
    wbufsize = -1
    disable_nagle_algorithm = True

    # --- method entry points: every method goes through one dispatcher -------------------
    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    # --- response helpers ----------------------------------------------------------------
    def _send_json(self, code: int, payload: object, headers: dict[str, str] | None = None) -> None:
        body = (json.dumps(payload, indent=2) + "\n").encode("utf-8")
        self._send_raw(code, body, headers)

    def _send_raw(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors raised by the HTTP machinery itself (bad request line, unknown method, huge
        headers) are answered as Google JSON too, so no response is ever HTML."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        text = message or phrase
        if explain:
            text = f"{text}: {explain}"
        self._send_json(code, error_body(code, text))

    def log_message(self, format: str, *args: Any) -> None:
        # The request line never holds secrets (tokens travel in headers, keys in bodies).
        log.debug("admin API %s: " + format, self.address_string(), *args)

    # --- request plumbing ----------------------------------------------------------------
    def _read_body(self) -> bytes:
        """The request body (Content-Length or chunked); empty when there is none."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            return b""
        try:
            length = int(length_text)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, f"invalid Content-Length {length_text!r}") from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(400, f"request body of {length} bytes is not acceptable")
        data = self.rfile.read(length)
        if len(data) != length:
            self.close_connection = True
            raise ApiError(400, "request body truncated")
        return data

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise ApiError(400, "malformed chunked request body") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(out)
            if size < 0 or len(out) + size > MAX_BODY_BYTES:
                self.close_connection = True
                raise ApiError(400, "request body too large")
            out += self.rfile.read(size)
            self.rfile.readline(1024)

    def _json_object(self, raw: bytes, *, empty_ok: bool) -> dict[str, Any]:
        if not raw.strip():
            if empty_ok:
                return {}
            raise ApiError(400, "request body is empty; expected a JSON object")
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ApiError(400, "request body must be a JSON object")
        return value

    def _dispatch(self) -> None:
        path = unquote(urlsplit(self.path).path)
        is_admin = not path.startswith("/_emulator/")
        state = self.server.state
        status = 500
        if is_admin:
            with state.lock:
                state.counters.admin_requests += 1
        entry: dict[str, Any] | None = None
        try:
            # Read the body first, whatever happens next, so keep-alive stays in sync.
            raw = self._read_body()
            if is_admin:
                entry = self._record_request(raw)
            status = self._admin(path, raw) if is_admin else self._emulator(path, raw)
        except ApiError as exc:
            status = exc.code
            self._send_json(exc.code, error_body(exc.code, exc.message), exc.headers)
        except Exception:
            log.exception("admin API: internal error on %s %s", self.command, path)
            status = 500
            self._send_json(500, error_body(500, "internal error in the emulator"))
        finally:
            if is_admin and status >= 400:
                with state.lock:
                    state.counters.admin_errors += 1
            if entry is not None:
                with state.lock:
                    entry["status"] = status
                    entry["t_end"] = time.monotonic()

    def _record_request(self, raw: bytes) -> dict[str, Any]:
        """Append this Admin API request to the state's log (``GET /_emulator/requests``).

        Recorded before latency or faults apply, so ``t_start`` is when the request arrived and
        two requests overlap in time iff each one's ``t_start`` precedes the other's ``t_end``.
        The bearer token is never stored: the Authorization value becomes a fixed placeholder.
        """
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = "Bearer <redacted>" if key == "authorization" else value
        body: Any = None
        if raw.strip():
            try:
                body = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                body = None
        entry: dict[str, Any] = {
            "method": self.command,
            "path": self.path,
            "headers": headers,
            "body": body,
            "t_start": time.monotonic(),
            "t_end": None,
            "status": None,
        }
        state = self.server.state
        with state.lock:
            state.requests_log.append(entry)
        return entry

    # --- the Admin API -------------------------------------------------------------------
    def _admin(self, path: str, raw: bytes) -> int:
        state = self.server.state
        with state.lock:
            latency = state.admin_latency_s
        if latency > 0:
            time.sleep(latency)
        failure = state.take_admin_failure()
        if failure is not None:
            raise ApiError(failure.status, failure.message)
        if state.take_malformed_json():
            self._send_raw(200, MALFORMED_BODY)
            return 200

        m = _CONNECTION_INFO_RE.fullmatch(path)
        if m is not None:
            self._require_method("GET")
            name = InstanceName(m["project"], m["region"], m["cluster"], m["instance"])
            return self._connection_info(name)
        m = _GENERATE_RE.fullmatch(path)
        if m is not None:
            self._require_method("POST")
            parent = f"projects/{m['project']}/locations/{m['region']}/clusters/{m['cluster']}"
            return self._generate(parent, raw)
        raise ApiError(404, f"no such Admin API method: {self.command} {path}")

    def _require_method(self, allowed: str) -> None:
        if self.command != allowed:
            raise ApiError(
                405,
                f"method {self.command} is not allowed here; use {allowed}",
                {"Allow": allowed},
            )

    def _authenticate(self) -> str:
        """The principal behind the bearer token; 401 for anything else (§10)."""
        challenge = {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'}
        header = self.headers.get("Authorization")
        if header is None:
            raise ApiError(
                401,
                "Request is missing required authentication credential. Expected OAuth 2 "
                "access token, login cookie or other valid authentication credential.",
                challenge,
            )
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise ApiError(
                401,
                "Request had invalid authentication credentials: malformed "
                "Authorization header, expected 'Bearer <token>'.",
                challenge,
            )
        principal = self.server.state.principal_for(token)
        if principal is None:
            raise ApiError(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access "
                "token, login cookie or other valid authentication credential.",
                challenge,
            )
        return principal

    def _authorize(self, principal: str, cluster_parent: str, permission: str, name: str) -> None:
        # Permission is checked before existence, as Google does.
        if self.server.state.is_forbidden(principal, cluster_parent):
            raise ApiError(
                403,
                f"The caller does not have permission '{permission}' on resource "
                f"'{name}' (principal {principal}).",
            )

    def _connection_info(self, name: InstanceName) -> int:
        principal = self._authenticate()
        self._authorize(principal, name.cluster_parent, "alloydb.instances.get", name.uri)
        state = self.server.state
        with state.lock:
            inst = state.instances.get(name.uri)
        if inst is None:
            raise ApiError(404, f"Resource '{name.uri}' was not found.")
        body: dict[str, Any] = {"name": f"{inst.name.uri}/connectionInfo"}
        # Absent, never "": the 1.7.0 Python connector would dial ("", 5433) (§2.2).
        if inst.ip_address:
            body["ipAddress"] = inst.ip_address
        if inst.public_ip_address:
            body["publicIpAddress"] = inst.public_ip_address
        if inst.psc_dns_name:
            body["pscDnsName"] = inst.psc_dns_name
        body["instanceUid"] = inst.instance_uid
        self._send_json(200, body)
        return 200

    def _generate(self, parent: str, raw: bytes) -> int:
        principal = self._authenticate()
        self._authorize(principal, parent, "alloydb.clusters.generateClientCertificate", parent)
        state = self.server.state
        if not state.cluster_exists(parent):
            raise ApiError(404, f"Resource '{parent}' was not found.")
        body = self._json_object(raw, empty_ok=False)

        body_parent = body.get("parent")
        if body_parent not in (None, "") and body_parent != parent:
            raise ApiError(
                400, f"parent {body_parent!r} in the body does not match the URL parent {parent!r}"
            )
        public_key = _field(body, "publicKey", "public_key")
        if public_key in (None, ""):
            if _field(body, "pemCsr", "pem_csr"):
                raise ApiError(400, "pemCsr is not supported; send publicKey")
            raise ApiError(400, "publicKey is required")
        if not isinstance(public_key, str):
            raise ApiError(400, "publicKey must be a string")
        use_mdx = _field(body, "useMetadataExchange", "use_metadata_exchange")
        if use_mdx is None:
            use_mdx = False
        if not isinstance(use_mdx, bool):
            raise ApiError(400, f"useMetadataExchange must be a boolean, got {use_mdx!r}")
        duration = _field(body, "certDuration", "cert_duration")
        requested = DEFAULT_CERT_DURATION_S if duration is None else parse_duration(duration)

        with state.lock:
            override = state.cert_lifetime_s
        if override is not None:
            lifetime = override
        else:
            # certDuration is a hint between 1 h and 24 h (§2.3).
            lifetime = min(max(requested, MIN_CERT_DURATION_S), MAX_CERT_DURATION_S)

        try:
            issued = self.server.pki.sign_client_certificate(
                parent, public_key, lifetime, use_mdx, principal
            )
        except PKIError as exc:
            raise ApiError(400, str(exc)) from None
        state.record_issued(
            IssuedCert(
                serial=issued.serial,
                cluster_parent=parent,
                use_metadata_exchange=use_mdx,
                not_after=issued.not_after,
                principal=principal,
            )
        )
        self._send_json(
            200, {"pemCertificateChain": issued.chain_pems, "caCert": issued.ca_cert_pem}
        )
        return 200

    # --- fault injection -----------------------------------------------------------------
    def _emulator(self, path: str, raw: bytes) -> int:
        route = _EMULATOR_ROUTES.get(path)
        if route is None:
            raise ApiError(404, f"no such emulator endpoint: {path}")
        method, handler = route
        self._require_method(method)
        body = self._json_object(raw, empty_ok=True)
        result = handler(self, body)
        self._send_json(200, result)
        return 200

    def _fault_fail(self, body: dict[str, Any]) -> dict[str, Any]:
        count = _int_arg(body, "count", 1, lo=0, hi=1_000_000)
        status = _int_arg(body, "status", 503, lo=400, hi=599)
        message = body.get("message")
        if message is None:
            message = f"injected failure ({google_status(status)})"
        if not isinstance(message, str):
            raise ApiError(400, "message must be a string")
        state = self.server.state
        with state.lock:
            state.fail_next(count, status, message)
            pending = len(state.admin_failures)
        return {"ok": True, "pending_failures": pending}

    def _fault_malformed(self, body: dict[str, Any]) -> dict[str, Any]:
        count = _int_arg(body, "count", 1, lo=0, hi=1_000_000)
        state = self.server.state
        with state.lock:
            state.malformed_json_next += count
            pending = state.malformed_json_next
        return {"ok": True, "pending_malformed": pending}

    def _fault_latency(self, body: dict[str, Any]) -> dict[str, Any]:
        seconds = body.get("seconds")
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds)
            or not 0 <= seconds <= 600
        ):
            raise ApiError(400, f"seconds must be a number between 0 and 600, got {seconds!r}")
        state = self.server.state
        with state.lock:
            state.admin_latency_s = float(seconds)
        return {"ok": True, "latency_s": float(seconds)}

    def _fault_mdx(self, body: dict[str, Any]) -> dict[str, Any]:
        refuse = _bool_arg(body, "refuse", True)
        message = body.get("message", "metadata exchange refused by the emulator")
        if not isinstance(message, str):
            raise ApiError(400, "message must be a string")
        state = self.server.state
        with state.lock:
            state.mdx_refusal = message if refuse else None
        return {"ok": True, "mdx_refusal": message if refuse else None}

    def _fault_drop(self, body: dict[str, Any]) -> dict[str, Any]:
        enabled = _bool_arg(body, "enabled", True)
        state = self.server.state
        with state.lock:
            state.drop_after_handshake = enabled
        return {"ok": True, "drop_after_handshake": enabled}

    def _fault_one_byte(self, body: dict[str, Any]) -> dict[str, Any]:
        enabled = _bool_arg(body, "enabled", True)
        state = self.server.state
        with state.lock:
            state.one_byte_records = enabled
        return {"ok": True, "one_byte_records": enabled}

    def _fault_rotate(self, body: dict[str, Any]) -> dict[str, Any]:
        state = self.server.state
        cluster = body.get("cluster")
        if cluster is None:
            with state.lock:
                clusters = sorted({i.name.cluster_parent for i in state.instances.values()})
        else:
            if not isinstance(cluster, str) or not _CLUSTER_PARENT_RE.fullmatch(cluster):
                raise ApiError(400, "cluster must look like projects/P/locations/R/clusters/C")
            if not state.cluster_exists(cluster):
                raise ApiError(404, f"no configured instance lives in cluster {cluster!r}")
            clusters = [cluster]
        pki = self.server.pki
        for c in clusters:
            pki.rotate(c)
        return {"ok": True, "generations": {c: pki.generation(c) for c in clusters}}

    def _fault_forbid(self, body: dict[str, Any]) -> dict[str, Any]:
        principal = body.get("principal")
        cluster = body.get("cluster")
        if not isinstance(principal, str) or not principal:
            raise ApiError(400, "principal must be a non-empty string")
        if not isinstance(cluster, str) or not _CLUSTER_PARENT_RE.fullmatch(cluster):
            raise ApiError(400, "cluster must look like projects/P/locations/R/clusters/C")
        forbidden = _bool_arg(body, "forbidden", True)
        state = self.server.state
        with state.lock:
            if forbidden:
                state.forbidden.add((principal, cluster))
            else:
                state.forbidden.discard((principal, cluster))
        return {"ok": True, "principal": principal, "cluster": cluster, "forbidden": forbidden}

    def _fault_reset(self, body: dict[str, Any]) -> dict[str, Any]:
        self.server.state.reset_faults()
        return {"ok": True}

    def _requests_list(self, body: dict[str, Any]) -> dict[str, Any]:
        """The recorded Admin API requests, oldest first (copies: entries may still be open)."""
        state = self.server.state
        with state.lock:
            entries = [dict(e) for e in state.requests_log]
        return {"requests": entries}

    def _requests_clear(self, body: dict[str, Any]) -> dict[str, Any]:
        state = self.server.state
        with state.lock:
            state.requests_log.clear()
        return {"ok": True}

    def _state_snapshot(self, body: dict[str, Any]) -> dict[str, Any]:
        """Counters, faults and instances; never tokens."""
        state = self.server.state
        with state.lock:
            instances = [
                {
                    "uri": i.name.uri,
                    "instance_uid": i.instance_uid,
                    "ip_address": i.ip_address,
                    "public_ip_address": i.public_ip_address,
                    "psc_dns_name": i.psc_dns_name,
                }
                for i in state.instances.values()
            ]
            snapshot: dict[str, Any] = {
                "counters": dataclasses.asdict(state.counters),
                "faults": {
                    "admin_failures": [
                        {"status": f.status, "message": f.message} for f in state.admin_failures
                    ],
                    "malformed_json_next": state.malformed_json_next,
                    "admin_latency_s": state.admin_latency_s,
                    "mdx_refusal": state.mdx_refusal,
                    "drop_after_handshake": state.drop_after_handshake,
                    "one_byte_records": state.one_byte_records,
                },
                "instances": instances,
                "cert_lifetime_s": state.cert_lifetime_s,
                "forbidden": [{"principal": p, "cluster": c} for p, c in sorted(state.forbidden)],
                "issued_certificates": len(state.issued),
            }
        pki = self.server.pki
        snapshot["ca_generations"] = {c: pki.generation(c) for c in pki.known_clusters()}
        return snapshot


def _int_arg(body: dict[str, Any], key: str, default: int, *, lo: int, hi: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ApiError(400, f"{key} must be an integer between {lo} and {hi}, got {value!r}")
    return value


def _bool_arg(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false, got {value!r}")
    return value


_EmulatorHandler = Callable[[AdminHandler, dict[str, Any]], dict[str, Any]]
_EMULATOR_ROUTES: dict[str, tuple[str, _EmulatorHandler]] = {
    "/_emulator/fail": ("POST", AdminHandler._fault_fail),
    "/_emulator/malformed": ("POST", AdminHandler._fault_malformed),
    "/_emulator/latency": ("POST", AdminHandler._fault_latency),
    "/_emulator/mdx": ("POST", AdminHandler._fault_mdx),
    "/_emulator/drop-after-handshake": ("POST", AdminHandler._fault_drop),
    "/_emulator/one-byte-records": ("POST", AdminHandler._fault_one_byte),
    "/_emulator/rotate-ca": ("POST", AdminHandler._fault_rotate),
    "/_emulator/forbid": ("POST", AdminHandler._fault_forbid),
    "/_emulator/reset": ("POST", AdminHandler._fault_reset),
    "/_emulator/state": ("GET", AdminHandler._state_snapshot),
    "/_emulator/requests": ("GET", AdminHandler._requests_list),
    "/_emulator/requests/clear": ("POST", AdminHandler._requests_clear),
}


def make_admin_server(state: EmulatorState, pki: PKI, host: str, port: int) -> AdminServer:
    """Bind the Admin API on ``host:port`` (0 = any free port); the caller runs
    ``serve_forever`` in a thread and reads the bound port from ``server_address``."""
    cls = AdminServer6 if ":" in host else AdminServer
    server = cls((host, port), AdminHandler)
    server.state = state
    server.pki = pki
    return server
