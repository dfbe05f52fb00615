# google-auth is unannotated; calling it is allowed here (see fastproxy/credentials.py).
# mypy: disallow-untyped-calls=False
"""The Admin API client (fastproxy.admin) against the emulator as a real process.

Faults injected into the session-wide emulator are undone in ``finally`` (and by the autouse
fixture's ``/_emulator/reset``), because other test modules share it. Responses the emulator can
never produce (a certificate for another key, an expired one, no address) come from a tiny
in-process HTTP server.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import google.oauth2.credentials
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

import fastproxy
from fastproxy.admin import AdminAPIError, AdminClient, validate_endpoint
from fastproxy.errors import ConfigError
from fastproxy.instance_uri import InstanceURI
from fastproxy.keys import generate_key, public_key_pem
from fastproxy.tlsctx import load_certificates
from tests.conftest import EmulatorProcess
from tests.e2e_support import free_port
from tests.fault_support import chain_for, json_http_server

SHORT = "demo-project.us-central1.demo-cluster.demo-primary"


# --- helpers -------------------------------------------------------------------------------
def _emu_post(emu: EmulatorProcess, path: str, body: dict[str, Any] | None = None) -> None:
    r = requests.post(f"{emu.admin_endpoint}{path}", json=body or {}, timeout=30)
    r.raise_for_status()


def _requests_log(emu: EmulatorProcess) -> list[dict[str, Any]]:
    r = requests.get(f"{emu.admin_endpoint}/_emulator/requests", timeout=30)
    r.raise_for_status()
    return list(r.json()["requests"])


def _creds(token: str) -> google.oauth2.credentials.Credentials:
    return google.oauth2.credentials.Credentials(token)


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return generate_key()


@pytest.fixture(scope="module")
def pem(key: rsa.RSAPrivateKey) -> str:
    return public_key_pem(key)


@pytest.fixture
def emu(emulator_echo: EmulatorProcess) -> Iterator[EmulatorProcess]:
    """The shared echo emulator, with a clean request log and no faults left behind."""
    _emu_post(emulator_echo, "/_emulator/reset")
    _emu_post(emulator_echo, "/_emulator/requests/clear")
    try:
        yield emulator_echo
    finally:
        _emu_post(emulator_echo, "/_emulator/reset")


@pytest.fixture
def uri(emu: EmulatorProcess) -> InstanceURI:
    return InstanceURI.parse(emu.instance(0)["uri"])


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_client(
    emu: EmulatorProcess, sleeps: list[float]
) -> Iterator[Callable[..., AdminClient]]:
    made: list[AdminClient] = []

    def make(token: str | None = None, **kwargs: Any) -> AdminClient:
        kwargs.setdefault("endpoint", emu.admin_endpoint)
        kwargs.setdefault("sleep", sleeps.append)
        client = AdminClient(_creds(token or emu.token), **kwargs)
        made.append(client)
        return client

    yield make
    for c in made:
        c.close()


# --- the happy path ------------------------------------------------------------------------
def test_fetch_returns_validated_material(
    make_client: Callable[..., AdminClient],
    emu: EmulatorProcess,
    uri: InstanceURI,
    key: rsa.RSAPrivateKey,
    pem: str,
) -> None:
    inst = emu.instance(0)
    before = time.time()
    material = make_client().fetch(uri, pem)
    assert material.uri == uri
    assert material.ip_addresses == {
        "PRIVATE": inst["ip_address"],
        "PUBLIC": inst["public_ip_address"],
        "PSC": inst["psc_dns_name"].rstrip("."),
    }
    assert not material.ip_addresses["PSC"].endswith(".")
    assert material.instance_uid == inst["instance_uid"]
    assert len(material.chain_pems) == 3
    assert all(p.endswith("\n") for p in material.chain_pems)
    leaf = load_certificates([material.chain_pems[0]])[0]
    leaf_key = leaf.public_key()
    assert isinstance(leaf_key, rsa.RSAPublicKey)
    assert leaf_key.public_numbers() == key.public_key().public_numbers()
    ca = load_certificates([material.ca_cert_pem])[0]
    assert ca.subject == load_certificates([material.chain_pems[-1]])[0].subject
    assert material.expires_at == leaf.not_valid_after_utc.timestamp()
    # certDuration 3600 s, as requested
    assert before + 3500 < material.expires_at < before + 3700


def test_both_calls_are_sent_with_the_expected_headers_and_body(
    make_client: Callable[..., AdminClient], emu: EmulatorProcess, uri: InstanceURI, pem: str
) -> None:
    client = make_client(user_agent="  extra/1.0   other/2 ", quota_project="billing-proj")
    client.fetch(uri, pem)
    log = _requests_log(emu)
    assert len(log) == 2
    by_method = {e["method"]: e for e in log}
    get, post = by_method["GET"], by_method["POST"]
    assert get["path"] == f"/v1beta/{uri.uri}/connectionInfo"
    assert post["path"] == f"/v1beta/{uri.cluster_parent}:generateClientCertificate"
    assert get["headers"]["x-goog-request-params"] == (
        "parent=projects%2Fdemo-project%2Flocations%2Fus-central1%2Fclusters%2Fdemo-cluster"
        "%2Finstances%2Fdemo-primary"
    )
    assert post["headers"]["x-goog-request-params"] == (
        "parent=projects%2Fdemo-project%2Flocations%2Fus-central1%2Fclusters%2Fdemo-cluster"
    )
    for entry in (get, post):
        h = entry["headers"]
        assert h["user-agent"] == f"fastproxy/{fastproxy.__version__} extra/1.0 other/2"
        assert h["x-goog-api-client"].startswith("gl-python/")
        assert f"fastproxy/{fastproxy.__version__}" in h["x-goog-api-client"]
        assert h["x-goog-user-project"] == "billing-proj"
        assert h["content-type"] == "application/json"
        # the emulator never stores the token
        assert h["authorization"] == "Bearer <redacted>"
        assert emu.token not in json.dumps(entry)
        assert entry["status"] == 200
    assert post["body"] == {
        "parent": uri.cluster_parent,
        "publicKey": pem,
        "certDuration": "3600s",
        "useMetadataExchange": True,
    }
    assert get["body"] is None


def test_no_quota_project_header_unless_asked(
    make_client: Callable[..., AdminClient], emu: EmulatorProcess, uri: InstanceURI, pem: str
) -> None:
    make_client().fetch(uri, pem)
    for entry in _requests_log(emu):
        assert "x-goog-user-project" not in entry["headers"]
        assert entry["headers"]["user-agent"] == f"fastproxy/{fastproxy.__version__}"


def test_use_metadata_exchange_false_is_omitted_and_duration_is_sent(
    make_client: Callable[..., AdminClient], emu: EmulatorProcess, uri: InstanceURI, pem: str
) -> None:
    make_client().fetch(uri, pem, use_metadata_exchange=False, cert_duration_s=7200)
    (post,) = [e for e in _requests_log(emu) if e["method"] == "POST"]
    assert "useMetadataExchange" not in post["body"]
    assert post["body"]["certDuration"] == "7200s"


def test_requests_log_can_be_cleared(
    make_client: Callable[..., AdminClient], emu: EmulatorProcess, uri: InstanceURI
) -> None:
    make_client().get_connection_info(uri)
    assert len(_requests_log(emu)) == 1
    _emu_post(emu, "/_emulator/requests/clear")
    assert _requests_log(emu) == []


def test_the_two_calls_run_concurrently(
    make_client: Callable[..., AdminClient], emu: EmulatorProcess, uri: InstanceURI, pem: str
) -> None:
    _emu_post(emu, "/_emulator/latency", {"seconds": 0.5})
    try:
        make_client().fetch(uri, pem)
    finally:
        _emu_post(emu, "/_emulator/latency", {"seconds": 0})
    a, b = _requests_log(emu)
    # Each request spent >= 0.5 s in the server; they overlap iff each began before the other
    # ended. Sequential calls would give b.t_start >= a.t_end.
    assert a["t_end"] - a["t_start"] >= 0.45
    assert a["t_start"] < b["t_end"] and b["t_start"] < a["t_end"]


@pytest.mark.parametrize("version", ["v1", "v1alpha", "v1beta"])
def test_api_version_is_selectable(
    make_client: Callable[..., AdminClient],
    emu: EmulatorProcess,
    uri: InstanceURI,
    pem: str,
    version: str,
) -> None:
    make_client(api_version=version).fetch(uri, pem)
    paths = [e["path"] for e in _requests_log(emu)]
    assert len(paths) == 2
    assert all(p.startswith(f"/{version}/projects/") for p in paths)


def test_unknown_api_version_and_bad_endpoints_are_config_errors() -> None:
    creds = _creds("t")
    with pytest.raises(ConfigError, match="unsupported Admin API version"):
        AdminClient(creds, api_version="v2")
    for bad in ("ftp://example.com", "alloydb.googleapis.com", "http://", "http://h/?q=1"):
        with pytest.raises(ConfigError, match="invalid Admin API endpoint"):
            AdminClient(creds, endpoint=bad)
    assert validate_endpoint("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    assert validate_endpoint("https://h/prefix//") == "https://h/prefix"


# --- retries -------------------------------------------------------------------------------
def test_503_is_retried_with_exponential_backoff(
    make_client: Callable[..., AdminClient],
    emu: EmulatorProcess,
    uri: InstanceURI,
    sleeps: list[float],
) -> None:
    _emu_post(emu, "/_emulator/fail", {"count": 2, "status": 503})
    try:
        info = make_client().get_connection_info(uri)
    finally:
        _emu_post(emu, "/_emulator/reset")
    assert sleeps == [1.0, 1.3]
    assert "PRIVATE" in info.ip_addresses
    assert [e["status"] for e in _requests_log(emu)] == [503, 503, 200]


def test_fetch_retries_each_call_independently(
    make_client: Callable[..., AdminClient],
    emu: EmulatorProcess,
    uri: InstanceURI,
    pem: str,
    sleeps: list[float],
) -> None:
    _emu_post(emu, "/_emulator/fail", {"count": 1, "status": 503})
    try:
        material = make_client().fetch(uri, pem)
    finally:
        _emu_post(emu, "/_emulator/reset")
    assert sleeps == [1.0]
    assert material.chain_pems
    assert sorted(e["status"] for e in _requests_log(emu)) == [200, 200, 503]


def test_503_gives_up_after_max_attempts_and_delay_is_capped(
    make_client: Callable[..., AdminClient],
    emu: EmulatorProcess,
    uri: InstanceURI,
    sleeps: list[float],
) -> None:
    _emu_post(emu, "/_emulator/fail", {"count": 10, "status": 503, "message": "try later"})
    try:
        with pytest.raises(AdminAPIError) as info:
            make_client(max_attempts=4, max_retry_delay=1.2).get_connection_info(uri)
    finally:
        _emu_post(emu, "/_emulator/reset")
    assert sleeps == [1.0, 1.2, 1.2]
    exc = info.value
    assert exc.status == 503
    assert exc.api_message == "try later"
    assert str(exc).endswith("try later (HTTP 503)")
    assert "4 attempts" in str(exc)
    assert len(_requests_log(emu)) == 4


def test_500_is_not_retried(
    make_client: Callable[..., AdminClient],
    emu: EmulatorProcess,
    uri: InstanceURI,
    pem: str,
    sleeps: list[float],
) -> None:
    _emu_post(emu, "/_emulator/fail", {"count": 1, "status": 500, "message": "boom"})
    try:
        with pytest.raises(AdminAPIError) as info:
            make_client().generate_client_certificate(uri, pem)
    finally:
        _emu_post(emu, "/_emulator/reset")
    assert sleeps == []
    assert info.value.status == 500
    assert str(info.value) == (
        f"Admin API generateClientCertificate failed for instance {SHORT}: boom (HTTP 500)"
    )
    assert len(_requests_log(emu)) == 1


# --- errors --------------------------------------------------------------------------------
def test_401_names_rejected_credentials(
    make_client: Callable[..., AdminClient], uri: InstanceURI, pem: str
) -> None:
    with pytest.raises(AdminAPIError) as info:
        make_client(token="not-a-known-token").fetch(uri, pem)
    exc = info.value
    assert exc.status == 401
    assert str(exc).startswith(f"credentials were rejected by the Admin API (instance {SHORT}): ")
    assert str(exc).endswith("(HTTP 401)")
    assert "not-a-known-token" not in str(exc)
    assert "\n" not in str(exc)


def test_403_names_the_instance_and_the_api_message(
    make_client: Callable[..., AdminClient], emu: EmulatorProcess, uri: InstanceURI, pem: str
) -> None:
    principal = emu.info["tokens"][0]["principal"]
    forbid = {"principal": principal, "cluster": uri.cluster_parent}
    _emu_post(emu, "/_emulator/forbid", {**forbid, "forbidden": True})
    try:
        with pytest.raises(AdminAPIError) as info:
            make_client().fetch(uri, pem)
    finally:
        _emu_post(emu, "/_emulator/forbid", {**forbid, "forbidden": False})
    exc = info.value
    assert exc.status == 403
    assert exc.instance == SHORT
    assert exc.api_message and "permission" in exc.api_message
    assert str(exc) == (
        f"caller lacks permission to use instance {SHORT}: {exc.api_message} (HTTP 403)"
    )


def test_404_for_an_unknown_instance(
    make_client: Callable[..., AdminClient], uri: InstanceURI, pem: str
) -> None:
    missing = InstanceURI(uri.project, uri.region, uri.cluster, "no-such-instance")
    with pytest.raises(AdminAPIError) as info:
        make_client().fetch(missing, pem)
    exc = info.value
    assert exc.status == 404
    assert str(exc).startswith(f"instance not found: {missing.short}: ")
    assert str(exc).endswith("(HTTP 404)")


def test_malformed_json_is_reported(
    make_client: Callable[..., AdminClient], emu: EmulatorProcess, uri: InstanceURI, pem: str
) -> None:
    _emu_post(emu, "/_emulator/malformed", {"count": 2})
    try:
        with pytest.raises(AdminAPIError) as info:
            make_client().fetch(uri, pem)
    finally:
        _emu_post(emu, "/_emulator/reset")
    assert info.value.status == 0
    assert "not valid JSON" in str(info.value)
    assert SHORT in str(info.value)


def test_connection_refused_names_the_endpoint(uri: InstanceURI, pem: str) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    with AdminClient(_creds("t"), endpoint=endpoint) as client, pytest.raises(
        AdminAPIError
    ) as info:
        client.fetch(uri, pem)
    text = str(info.value)
    assert text.startswith(f"cannot reach the Admin API at {endpoint} (instance {SHORT}")
    assert "Connection refused" in text
    assert "\n" not in text and "object at 0x" not in text


def test_timeout_is_reported(
    make_client: Callable[..., AdminClient], emu: EmulatorProcess, uri: InstanceURI
) -> None:
    _emu_post(emu, "/_emulator/latency", {"seconds": 1.5})
    try:
        with pytest.raises(AdminAPIError, match=r"did not answer connectionInfo .* within 0.3 s"):
            make_client(timeout=0.3).get_connection_info(uri)
    finally:
        _emu_post(emu, "/_emulator/latency", {"seconds": 0})


def test_closed_client_refuses_work(
    make_client: Callable[..., AdminClient], uri: InstanceURI, pem: str
) -> None:
    client = make_client()
    client.close()
    client.close()  # idempotent
    with pytest.raises(AdminAPIError, match="closed"):
        client.fetch(uri, pem)


# --- responses the emulator never sends: a scripted server ----------------------------------
class _Scripted:
    """Answers for the scripted server: (status, JSON-able body) per RPC."""

    def __init__(self) -> None:
        self.info: tuple[int, Any] = (200, {"ipAddress": "10.0.0.1", "instanceUid": "u"})
        self.cert: tuple[int, Any] = (500, {})


@pytest.fixture
def scripted() -> Iterator[tuple[str, _Scripted]]:
    script = _Scripted()

    def answer(handler: BaseHTTPRequestHandler, body: bytes | None) -> tuple[int, bytes]:
        status, reply = script.info if handler.path.endswith("/connectionInfo") else script.cert
        return status, json.dumps(reply).encode()

    with json_http_server(answer) as endpoint:
        yield endpoint, script


def _fetch_scripted(endpoint: str, pem: str) -> AdminAPIError:
    uri = InstanceURI("p", "r", "c", "i")
    with AdminClient(_creds("t"), endpoint=endpoint) as client, pytest.raises(
        AdminAPIError
    ) as info:
        client.fetch(uri, pem)
    assert info.value.instance == "p.r.c.i"
    assert "\n" not in str(info.value)
    return info.value


def test_certificate_for_another_key_is_refused(
    scripted: tuple[str, _Scripted], pem: str
) -> None:
    endpoint, script = scripted
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    chain, ca = chain_for(other.public_key(), dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    script.cert = (200, {"pemCertificateChain": chain, "caCert": ca})
    exc = _fetch_scripted(endpoint, pem)
    assert "different public key" in str(exc)
    assert exc.status == 0


def test_expired_certificate_is_refused(
    scripted: tuple[str, _Scripted], key: rsa.RSAPrivateKey, pem: str
) -> None:
    endpoint, script = scripted
    chain, ca = chain_for(key.public_key(), dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    script.cert = (200, {"pemCertificateChain": chain, "caCert": ca})
    assert "already expired" in str(_fetch_scripted(endpoint, pem))


def test_scripted_good_answer_and_snake_case_fields(
    scripted: tuple[str, _Scripted], key: rsa.RSAPrivateKey, pem: str
) -> None:
    endpoint, script = scripted
    chain, ca = chain_for(key.public_key(), dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    # protojson may emit proto field names; unknown fields are ignored
    script.cert = (200, {"pem_certificate_chain": chain, "ca_cert": ca, "extra": 1})
    script.info = (200, {"public_ip_address": "192.0.2.7", "psc_dns_name": "", "x": "y"})
    with AdminClient(_creds("t"), endpoint=endpoint) as client:
        material = client.fetch(InstanceURI("p", "r", "c", "i"), pem)
    assert material.ip_addresses == {"PUBLIC": "192.0.2.7"}
    assert material.instance_uid == ""


@pytest.mark.parametrize(
    ("cert_body", "fragment"),
    [
        ({"caCert": "x"}, "pemCertificateChain is missing"),
        ({"pemCertificateChain": [], "caCert": "x"}, "pemCertificateChain is missing"),
        ({"pemCertificateChain": ["garbage"], "caCert": "x"}, "not valid PEM"),
        ({"pemCertificateChain": [1], "caCert": "x"}, "non-PEM entry"),
        ({"pemCertificateChain": ["x"]}, "caCert is missing"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_malformed_certificate_answers(
    scripted: tuple[str, _Scripted], pem: str, cert_body: Any, fragment: str
) -> None:
    endpoint, script = scripted
    script.cert = (200, cert_body)
    assert fragment in str(_fetch_scripted(endpoint, pem))


@pytest.mark.parametrize(
    ("info_body", "fragment"),
    [
        ({"instanceUid": "u"}, "has no supported IP addresses"),
        ({"ipAddress": "", "publicIpAddress": "", "pscDnsName": "."}, "no supported IP"),
        ({"ipAddress": "db.example.com"}, "is not an IP address"),
        ({"ipAddress": 7}, "ipAddress is not a string"),
        ({"ipAddress": "10.0.0.1", "instanceUid": 5}, "instanceUid is not a string"),
    ],
)
def test_bad_connection_info_answers(
    scripted: tuple[str, _Scripted],
    key: rsa.RSAPrivateKey,
    pem: str,
    info_body: Any,
    fragment: str,
) -> None:
    endpoint, script = scripted
    chain, ca = chain_for(key.public_key(), dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    script.cert = (200, {"pemCertificateChain": chain, "caCert": ca})
    script.info = (200, info_body)
    assert fragment in str(_fetch_scripted(endpoint, pem))


def test_non_json_error_body_still_gives_one_line(
    scripted: tuple[str, _Scripted], pem: str
) -> None:
    endpoint, script = scripted
    script.info = (502, "upstream\nfailure")
    exc = _fetch_scripted(endpoint, pem)
    assert exc.status == 502
    assert str(exc).endswith("(HTTP 502)")
