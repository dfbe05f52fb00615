"""The fake Admin API over real HTTP on loopback: routing, auth, validation, faults.

Each test gets its own server on an OS-chosen port and its own EmulatorState, so fault
switches never leak between tests; the client key and the PKI's CAs are made once per module.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fastproxy.emulator.adminapi import AdminServer, make_admin_server
from fastproxy.emulator.pki import PKI, serial_of_pem
from fastproxy.emulator.state import Backend, EmulatorState, Instance, InstanceName

TOKEN = "good-token"
PRINCIPAL = "alice@example.com"
BAD_TOKEN = "mallory-token"
BAD_PRINCIPAL = "mallory@example.com"
CLUSTER = "projects/p/locations/us-central1/clusters/c"
URI_FULL = f"{CLUSTER}/instances/full"
URI_PRIVATE = f"{CLUSTER}/instances/private-only"
DOMAIN_CLUSTER = "projects/google.com:p/locations/r/clusters/d"
URI_DOMAIN = f"{DOMAIN_CLUSTER}/instances/i"
PSC = "abc.def.us-central1.alloydb-psc.goog."
GO_QUERY = "?%24alt=json%3Benum-encoding%3Dint"


def make_state() -> EmulatorState:
    instances = {
        URI_FULL: Instance(InstanceName.parse(URI_FULL), "uid-full", "127.0.0.2", "127.0.0.3", PSC),
        URI_PRIVATE: Instance(InstanceName.parse(URI_PRIVATE), "uid-priv", "127.0.0.4", None, None),
        URI_DOMAIN: Instance(InstanceName.parse(URI_DOMAIN), "uid-dom", None, None, PSC),
    }
    return EmulatorState(
        instances=instances,
        tokens={TOKEN: PRINCIPAL, BAD_TOKEN: BAD_PRINCIPAL},
        backend=Backend(kind="echo"),
        forbidden={(BAD_PRINCIPAL, CLUSTER)},
    )


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pub_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, pkcs1: bool = False) -> str:
    fmt = (
        serialization.PublicFormat.PKCS1
        if pkcs1
        else serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key.public_key().public_bytes(serialization.Encoding.PEM, fmt).decode()


@pytest.fixture(scope="module")
def spki(key: rsa.RSAPrivateKey) -> str:
    return pub_pem(key)


@pytest.fixture(scope="module")
def shared_pki() -> PKI:
    return PKI()


def rsa_numbers(key: object) -> rsa.RSAPublicNumbers:
    assert isinstance(key, rsa.RSAPublicKey)
    return key.public_numbers()


class Api:
    """A started server plus small request helpers."""

    def __init__(self, server: AdminServer, state: EmulatorState, pki: PKI) -> None:
        self.server = server
        self.state = state
        self.pki = pki
        host, port = server.server_address[:2]
        assert isinstance(host, str)
        self.base = f"http://{host}:{port}"
        self.session = requests.Session()

    def get(self, path: str, token: str | None = TOKEN, **kw: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        headers.update(kw.pop("headers", {}))
        return self.session.get(self.base + path, headers=headers, timeout=10, **kw)

    def post(
        self, path: str, body: Any = None, token: str | None = TOKEN, **kw: Any
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        headers.update(kw.pop("headers", {}))
        if body is not None and "data" not in kw:
            kw["json"] = body
        return self.session.post(self.base + path, headers=headers, timeout=10, **kw)

    def info(self, uri: str = URI_FULL, version: str = "v1beta", **kw: Any) -> requests.Response:
        return self.get(f"/{version}/{uri}/connectionInfo", **kw)

    def generate(
        self, body: dict[str, Any], cluster: str = CLUSTER, version: str = "v1alpha", **kw: Any
    ) -> requests.Response:
        return self.post(f"/{version}/{cluster}:generateClientCertificate", body, **kw)

    def emulator(self, name: str, body: Any = None) -> requests.Response:
        return self.session.post(f"{self.base}/_emulator/{name}", json=body, timeout=10)


@pytest.fixture
def api(shared_pki: PKI) -> Iterator[Api]:
    state = make_state()
    server = make_admin_server(state, shared_pki, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    a = Api(server, state, shared_pki)
    try:
        yield a
    finally:
        a.session.close()
        server.shutdown()
        server.server_close()
        thread.join(5)


def assert_error(resp: requests.Response, code: int, status: str) -> dict[str, Any]:
    assert resp.status_code == code, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    err = resp.json()["error"]
    assert err["code"] == code and err["status"] == status
    assert isinstance(err["message"], str) and err["message"]
    return dict(err)


# --- connectionInfo ----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v1beta", "v1alpha"])
def test_connection_info_all_versions(api: Api, version: str) -> None:
    resp = api.info(version=version)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.json() == {
        "name": f"{URI_FULL}/connectionInfo",
        "ipAddress": "127.0.0.2",
        "publicIpAddress": "127.0.0.3",
        "pscDnsName": PSC,
        "instanceUid": "uid-full",
    }


def test_connection_info_ignores_go_query_string(api: Api) -> None:
    resp = api.get(f"/v1alpha/{URI_FULL}/connectionInfo{GO_QUERY}")
    assert resp.status_code == 200 and resp.json()["instanceUid"] == "uid-full"


def test_connection_info_omits_absent_addresses(api: Api) -> None:
    body = api.info(URI_PRIVATE).json()
    assert body == {
        "name": f"{URI_PRIVATE}/connectionInfo",
        "ipAddress": "127.0.0.4",
        "instanceUid": "uid-priv",
    }


@pytest.mark.parametrize("colon", [":", "%3A"])
def test_domain_scoped_project(api: Api, colon: str) -> None:
    uri = URI_DOMAIN.replace(":", colon)
    body = api.info(uri).json()
    assert body == {
        "name": f"{URI_DOMAIN}/connectionInfo",
        "pscDnsName": PSC,
        "instanceUid": "uid-dom",
    }
    resp = api.generate({"publicKey": "x"}, cluster=DOMAIN_CLUSTER.replace(":", colon))
    assert_error(resp, 400, "INVALID_ARGUMENT")  # reached validation: the route matched


# --- generateClientCertificate -----------------------------------------------------------


@pytest.mark.parametrize("pkcs1", [False, True])
@pytest.mark.parametrize("version", ["v1", "v1beta", "v1alpha"])
def test_generate_client_certificate(
    api: Api, key: rsa.RSAPrivateKey, pkcs1: bool, version: str
) -> None:
    body = {
        "parent": CLUSTER,
        "certDuration": "3600s",
        "publicKey": pub_pem(key, pkcs1),
        "useMetadataExchange": True,
    }
    resp = api.generate(body, version=version, params={"$alt": "json;enum-encoding=int"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    data = resp.json()
    assert set(data) == {"pemCertificateChain", "caCert"}
    chain = data["pemCertificateChain"]
    assert len(chain) == 3 and all(p.endswith("-----END CERTIFICATE-----\n") for p in chain)
    assert chain[2] == data["caCert"] == api.pki.ca_for(CLUSTER).root_pem
    leaf, inter, root = (x509.load_pem_x509_certificate(p.encode()) for p in chain)
    leaf.verify_directly_issued_by(inter)
    inter.verify_directly_issued_by(root)
    assert rsa_numbers(leaf.public_key()) == key.public_key().public_numbers()

    issued = api.state.lookup_issued(serial_of_pem(chain[0]))
    assert issued is not None
    assert issued.cluster_parent == CLUSTER and issued.principal == PRINCIPAL
    assert issued.use_metadata_exchange is True
    assert issued.not_after == leaf.not_valid_after_utc.timestamp()
    assert api.state.counters.certificates_issued == 1


def test_generate_minimal_old_python_body(api: Api, spki: str) -> None:
    """No parent, no useMetadataExchange (proto3 default false), no certDuration."""
    before = time.time()
    resp = api.generate({"publicKey": spki, "unknownField": {"x": 1}})
    assert resp.status_code == 200, resp.text
    serial = serial_of_pem(resp.json()["pemCertificateChain"][0])
    issued = api.state.lookup_issued(serial)
    assert issued is not None and issued.use_metadata_exchange is False
    assert before + 3598 <= issued.not_after <= time.time() + 3600


def test_generate_parent_mismatch(api: Api, spki: str) -> None:
    other = "projects/p/locations/us-central1/clusters/other"
    err = assert_error(api.generate({"parent": other, "publicKey": spki}), 400, "INVALID_ARGUMENT")
    assert "parent" in err["message"]


@pytest.mark.parametrize(
    ("duration", "expected"),
    [("7200s", 7200), ("3600.5s", 3600), ("60s", 3600), ("100000s", 86400), ("86400s", 86400)],
)
def test_cert_duration_clamped(api: Api, spki: str, duration: str, expected: int) -> None:
    before = time.time()
    resp = api.generate({"publicKey": spki, "certDuration": duration})
    assert resp.status_code == 200, resp.text
    leaf = x509.load_pem_x509_certificate(resp.json()["pemCertificateChain"][0].encode())
    lifetime = leaf.not_valid_after_utc.timestamp() - before
    assert expected - 2 <= lifetime <= expected + 1


def test_cert_lifetime_override(api: Api, spki: str) -> None:
    api.state.cert_lifetime_s = 10
    before = time.time()
    resp = api.generate({"publicKey": spki, "certDuration": "3600s"})
    leaf = x509.load_pem_x509_certificate(resp.json()["pemCertificateChain"][0].encode())
    assert before + 8 <= leaf.not_valid_after_utc.timestamp() <= time.time() + 10


@pytest.mark.parametrize("duration", ["abc", 3600, "3600", "-5s", "1.2345678901s", None])
def test_bad_cert_duration(api: Api, spki: str, duration: object) -> None:
    body: dict[str, Any] = {"publicKey": spki, "certDuration": duration}
    resp = api.generate(body)
    if duration is None:  # JSON null = absent
        assert resp.status_code == 200
    else:
        assert_error(resp, 400, "INVALID_ARGUMENT")


@pytest.mark.parametrize("case", ["rsa1024", "ec", "garbage", "not-a-string", "missing"])
def test_bad_public_key(api: Api, case: str) -> None:
    body: dict[str, Any]
    if case == "rsa1024":
        body = {
            "publicKey": pub_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
        }
    elif case == "ec":
        body = {"publicKey": pub_pem(ec.generate_private_key(ec.SECP256R1()))}
    elif case == "garbage":
        body = {"publicKey": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"}
    elif case == "not-a-string":
        body = {"publicKey": 42}
    else:
        body = {"certDuration": "3600s"}
    assert_error(api.generate(body), 400, "INVALID_ARGUMENT")
    assert api.state.counters.certificates_issued == 0


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe", b'"text"'])
def test_bad_json_body(api: Api, raw: bytes) -> None:
    resp = api.post(
        f"/v1alpha/{CLUSTER}:generateClientCertificate",
        data=raw,
        headers={"Content-Type": "application/json"},
    )
    assert_error(resp, 400, "INVALID_ARGUMENT")


def test_bad_use_metadata_exchange(api: Api, spki: str) -> None:
    resp = api.generate({"publicKey": spki, "useMetadataExchange": "yes"})
    assert_error(resp, 400, "INVALID_ARGUMENT")


def test_chunked_request_body(api: Api, spki: str) -> None:
    payload = json.dumps({"publicKey": spki}).encode()
    chunks = (payload[i : i + 100] for i in range(0, len(payload), 100))
    resp = api.post(f"/v1/{CLUSTER}:generateClientCertificate", data=chunks)
    assert resp.status_code == 200, resp.text


# --- authentication, authorization, existence --------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer unknown-token"},
        {"Authorization": "Bearer a b"},
    ],
)
def test_unauthenticated(api: Api, spki: str, headers: dict[str, str]) -> None:
    for resp in (
        api.info(token=None, headers=headers),
        api.generate({"publicKey": spki}, token=None, headers=headers),
    ):
        assert_error(resp, 401, "UNAUTHENTICATED")
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert api.state.counters.certificates_issued == 0


def test_permission_denied(api: Api, spki: str) -> None:
    err = assert_error(api.info(token=BAD_TOKEN), 403, "PERMISSION_DENIED")
    assert URI_FULL in err["message"] and "permission" in err["message"]
    err = assert_error(api.generate({"publicKey": spki}, token=BAD_TOKEN), 403, "PERMISSION_DENIED")
    assert CLUSTER in err["message"]
    # The ban is per cluster: the other cluster answers normally.
    assert api.info(URI_DOMAIN, token=BAD_TOKEN).status_code == 200


@pytest.mark.parametrize(
    "uri",
    [
        f"{CLUSTER}/instances/nope",
        "projects/p/locations/us-central1/clusters/nope/instances/full",
        "projects/nope/locations/us-central1/clusters/c/instances/full",
        "projects/p/locations/nope/clusters/c/instances/full",
    ],
)
def test_not_found_instance(api: Api, uri: str) -> None:
    err = assert_error(api.info(uri), 404, "NOT_FOUND")
    assert uri in err["message"]


def test_not_found_cluster(api: Api, spki: str) -> None:
    resp = api.generate({"publicKey": spki}, cluster="projects/p/locations/us-central1/clusters/x")
    assert_error(resp, 404, "NOT_FOUND")


@pytest.mark.parametrize(
    "path",
    [
        "/",
        f"/v2/{URI_FULL}/connectionInfo",
        f"/v1/{URI_FULL}",
        f"/v1/{URI_FULL}/x/connectionInfo",
        f"/v1/{CLUSTER}/instances/full:generateClientCertificate",
        "/v1/projects/a:b:c/locations/r/clusters/c/instances/i/connectionInfo",
        "/v1/projects/p/locations/r/clusters/c:d:generateClientCertificate",
    ],
)
def test_unknown_path(api: Api, path: str) -> None:
    assert_error(api.get(path), 404, "NOT_FOUND")


def test_wrong_method(api: Api, spki: str) -> None:
    resp = api.post(f"/v1/{URI_FULL}/connectionInfo", {"x": 1})
    assert_error(resp, 405, "UNIMPLEMENTED")
    assert resp.headers["Allow"] == "GET"
    resp = api.get(f"/v1/{CLUSTER}:generateClientCertificate")
    assert_error(resp, 405, "UNIMPLEMENTED")
    assert resp.headers["Allow"] == "POST"
    resp = api.session.request("DELETE", f"{api.base}/v1/{URI_FULL}/connectionInfo", timeout=10)
    assert_error(resp, 405, "UNIMPLEMENTED")


def test_unsupported_http_method_is_json_too(api: Api) -> None:
    resp = requests.request("BREW", f"{api.base}/v1/{URI_FULL}/connectionInfo", timeout=10)
    assert resp.status_code == 501
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.json()["error"]["status"] == "UNIMPLEMENTED"


# --- HTTP behaviour ----------------------------------------------------------------------


def test_keep_alive_and_concurrency(api: Api, spki: str) -> None:
    resp = api.info()
    assert resp.raw.version == 11 and resp.headers.get("Connection") != "close"
    assert "Content-Length" in resp.headers

    def refresh(_: int) -> tuple[int, int]:
        with requests.Session() as s:
            h = {"Authorization": f"Bearer {TOKEN}"}
            with ThreadPoolExecutor(2) as pool:
                a = pool.submit(
                    s.get,
                    f"{api.base}/v1alpha/{URI_FULL}/connectionInfo{GO_QUERY}",
                    headers=h,
                    timeout=10,
                )
                b = pool.submit(
                    s.post,
                    f"{api.base}/v1alpha/{CLUSTER}:generateClientCertificate",
                    json={"publicKey": spki, "useMetadataExchange": True},
                    headers=h,
                    timeout=10,
                )
                return a.result().status_code, b.result().status_code

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(refresh, range(16)))
    assert results == [(200, 200)] * 16
    assert api.state.counters.certificates_issued == 16
    assert api.state.counters.admin_requests == 33


def test_one_connection_serves_many_requests(api: Api, spki: str) -> None:
    """HTTP/1.1 keep-alive, across successes and ordinary errors alike."""
    host, port = api.server.server_address[:2]
    assert isinstance(host, str)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        conn.request("GET", f"/v1/{URI_FULL}/connectionInfo", headers=auth)
        first = conn.sock
        assert conn.getresponse().read() and first is not None
        conn.request("GET", f"/v1/{URI_FULL}/connectionInfo")  # 401
        unauth = conn.getresponse()
        assert unauth.status == 401 and json.loads(unauth.read())["error"]["code"] == 401
        body = json.dumps({"publicKey": spki})
        conn.request("POST", f"/v1/{CLUSTER}:generateClientCertificate", body, headers=auth)
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["caCert"]
        assert conn.sock is first
    finally:
        conn.close()


def test_logs_one_line_per_request_without_secrets(
    api: Api, spki: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="fastproxy.emulator.admin"):
        api.info()
        api.generate({"publicKey": spki})
        api.info(token="unknown-secret-token")
    lines = [r.getMessage() for r in caplog.records if r.name == "fastproxy.emulator.admin"]
    assert len(lines) == 3
    assert "connectionInfo" in lines[0] and "200" in lines[0]
    text = "\n".join(lines)
    for secret in (TOKEN, "unknown-secret-token", "BEGIN PUBLIC KEY"):
        assert secret not in text


# --- fault injection ---------------------------------------------------------------------


def test_fail_n_times_then_succeed(api: Api) -> None:
    assert api.emulator("fail", {"count": 2, "status": 503}).status_code == 200
    assert_error(api.info(), 503, "UNAVAILABLE")
    assert_error(api.info(token=None), 503, "UNAVAILABLE")  # before auth, like an outage
    assert api.info().status_code == 200
    assert api.state.counters.admin_requests == 3
    assert api.state.counters.admin_errors == 2


@pytest.mark.parametrize(
    ("status", "name"),
    [
        (500, "INTERNAL"),
        (429, "RESOURCE_EXHAUSTED"),
        (403, "PERMISSION_DENIED"),
        (404, "NOT_FOUND"),
        (401, "UNAUTHENTICATED"),
        (502, "UNKNOWN"),
    ],
)
def test_fail_status_names(api: Api, spki: str, status: int, name: str) -> None:
    api.emulator("fail", {"count": 1, "status": status, "message": "boom"})
    err = assert_error(api.generate({"publicKey": spki}), status, name)
    assert err["message"] == "boom"
    assert api.generate({"publicKey": spki}).status_code == 200


def test_latency(api: Api) -> None:
    assert api.emulator("latency", {"seconds": 0.3}).status_code == 200
    start = time.monotonic()
    assert api.info().status_code == 200
    assert time.monotonic() - start >= 0.3
    # /_emulator/ itself is never delayed, so a test can always switch it off.
    start = time.monotonic()
    api.emulator("latency", {"seconds": 0})
    assert time.monotonic() - start < 0.3
    assert api.state.admin_latency_s == 0


def test_malformed_json(api: Api, spki: str) -> None:
    assert api.emulator("malformed", {"count": 2}).json()["pending_malformed"] == 2
    for resp in (api.info(), api.generate({"publicKey": spki})):
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("application/json")
        with pytest.raises(ValueError):
            json.loads(resp.content)
    assert api.info().json()["instanceUid"] == "uid-full"


def test_switches(api: Api) -> None:
    api.emulator("mdx", {"refuse": True, "message": "nope"})
    assert api.state.mdx_refusal == "nope"
    api.emulator("mdx", {"refuse": False})
    assert api.state.mdx_refusal is None
    api.emulator("drop-after-handshake", {"enabled": True})
    api.emulator("one-byte-records", {"enabled": True})
    assert api.state.drop_after_handshake and api.state.one_byte_records
    api.emulator("fail", {"count": 3})
    api.emulator("malformed", {"count": 1})
    api.emulator("latency", {"seconds": 2})
    faults = api.session.get(f"{api.base}/_emulator/state", timeout=10).json()["faults"]
    assert len(faults["admin_failures"]) == 3 and faults["malformed_json_next"] == 1
    assert api.emulator("reset").status_code == 200
    s = api.state
    assert not s.admin_failures and s.malformed_json_next == 0 and s.admin_latency_s == 0
    assert not s.drop_after_handshake and not s.one_byte_records and s.mdx_refusal is None


def test_forbid_endpoint(api: Api) -> None:
    body = {"principal": PRINCIPAL, "cluster": CLUSTER, "forbidden": True}
    assert api.emulator("forbid", body).status_code == 200
    assert_error(api.info(), 403, "PERMISSION_DENIED")
    api.emulator("forbid", {**body, "forbidden": False})
    assert api.info().status_code == 200


def test_rotate_ca(spki: str) -> None:
    # Own PKI: rotation must not disturb the module's shared one.
    state = make_state()
    pki = PKI()
    server = make_admin_server(state, pki, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    api = Api(server, state, pki)
    try:
        root1 = api.generate({"publicKey": spki}).json()["caCert"]
        creds1 = pki.server_credentials(state.instances[URI_FULL])
        other1 = pki.server_credentials(state.instances[URI_DOMAIN])
        resp = api.emulator("rotate-ca", {"cluster": CLUSTER})
        assert resp.json()["generations"] == {CLUSTER: 2}
        root2 = api.generate({"publicKey": spki}).json()["caCert"]
        assert root2 != root1
        creds2 = pki.server_credentials(state.instances[URI_FULL])
        assert creds2.generation == creds1.generation + 1
        assert creds2.client_ca_pem == root2.encode()
        assert pki.server_credentials(state.instances[URI_DOMAIN]) is other1
        # Without a cluster: every configured cluster.
        gens = api.emulator("rotate-ca", {}).json()["generations"]
        assert gens == {CLUSTER: 3, DOMAIN_CLUSTER: 2}
        assert_error(
            api.emulator("rotate-ca", {"cluster": "projects/x/locations/r/clusters/y"}),
            404,
            "NOT_FOUND",
        )
        assert_error(api.emulator("rotate-ca", {"cluster": "bogus"}), 400, "INVALID_ARGUMENT")
    finally:
        api.session.close()
        server.shutdown()
        server.server_close()


def test_state_endpoint(api: Api, spki: str) -> None:
    api.info()
    api.generate({"publicKey": spki})
    api.info(token="wrong")
    snap = api.session.get(f"{api.base}/_emulator/state", timeout=10).json()
    assert snap["counters"]["admin_requests"] == 3
    assert snap["counters"]["admin_errors"] == 1
    assert snap["counters"]["certificates_issued"] == 1
    assert {i["uri"] for i in snap["instances"]} == {URI_FULL, URI_PRIVATE, URI_DOMAIN}
    assert TOKEN not in json.dumps(snap)
    assert snap["ca_generations"][CLUSTER] >= 1


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("fail", {"count": "x"}),
        ("fail", {"status": 200}),
        ("fail", {"count": -1}),
        ("fail", {"message": 5}),
        ("malformed", {"count": True}),
        ("latency", {"seconds": -1}),
        ("latency", {}),
        ("latency", {"seconds": "1"}),
        ("mdx", {"refuse": "yes"}),
        ("drop-after-handshake", {"enabled": 1}),
        ("one-byte-records", {"enabled": None}),
        ("forbid", {"principal": "", "cluster": CLUSTER}),
        ("forbid", {"principal": "a"}),
        ("fail", [1]),
    ],
)
def test_emulator_bad_bodies(api: Api, name: str, body: Any) -> None:
    assert_error(api.emulator(name, body), 400, "INVALID_ARGUMENT")


def test_emulator_bad_json_and_routes(api: Api) -> None:
    resp = api.session.post(f"{api.base}/_emulator/fail", data=b"{oops", timeout=10)
    assert_error(resp, 400, "INVALID_ARGUMENT")
    assert_error(api.emulator("nope", {}), 404, "NOT_FOUND")
    resp = api.session.get(f"{api.base}/_emulator/fail", timeout=10)
    assert_error(resp, 405, "UNIMPLEMENTED")
    # Fault endpoints are not Admin API calls: no counting, no faults applied to them.
    assert api.state.counters.admin_requests == 0
