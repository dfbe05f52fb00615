"""End to end: the emulator as a process, PostgreSQL behind it, a stdlib-ssl client in front."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pg8000.native
import pytest
import requests
from cryptography import x509

from tests.conftest import REPO, EmulatorProcess
from tests.emulator.stdlib_client import (
    AdminClient,
    connect,
    mdx_request,
    read_mdx_response,
    recv_exactly,
    tls_context,
)

pytestmark = pytest.mark.e2e

DEMO_URI = (
    "projects/demo-project/locations/us-central1/clusters/demo-cluster/instances/demo-primary"
)
DEMO_CLUSTER = DEMO_URI.rsplit("/instances/", 1)[0]
AUTO_IAM, DB_NATIVE = 2, 1


def _session(emu: EmulatorProcess, tmp_path: Path, token: str, auth_type: int) -> ssl.SSLSocket:
    admin = AdminClient(emu.admin_endpoint, token)
    material = admin.issue(DEMO_URI)
    sock = connect(tls_context(material, tmp_path), emu.instance()["ip_address"])
    sock.sendall(mdx_request(token, auth_type))
    code, error = read_mdx_response(sock)
    assert (code, error) == (1, "")
    return sock


# --- the ready file and the command line -------------------------------------------------------


def test_ready_file_has_every_field(emulator_echo: EmulatorProcess) -> None:
    info = emulator_echo.info
    assert info["admin_endpoint"].startswith("http://127.0.0.1:")
    assert info["tokens"][0]["token"] == "echo-token"
    inst = info["instances"][0]
    assert inst["uri"] == DEMO_URI
    for key in ("ip_address", "public_ip_address", "psc_dns_name", "instance_uid"):
        assert inst[key], key
    assert inst["ip_address"].startswith("127.") and inst["public_ip_address"].startswith("127.")
    assert inst["ip_address"] != "127.0.0.1"
    assert info["backend"]["kind"] == "echo"


def test_generated_token_is_printed_and_in_ready_file(
    emulator_factory: Callable[..., EmulatorProcess],
) -> None:
    emu = emulator_factory("--backend", "echo")
    token = emu.token
    assert len(token) > 20
    assert token in emu.log_text()
    assert "fastproxy --alloydbadmin-api-endpoint" in emu.log_text()


def test_two_emulators_do_not_collide(
    emulator_echo: EmulatorProcess, emulator_factory: Callable[..., EmulatorProcess]
) -> None:
    other = emulator_factory("--backend", "echo", "--instance", DEMO_URI)
    mine = {emulator_echo.instance()["ip_address"], emulator_echo.instance()["public_ip_address"]}
    theirs = {other.instance()["ip_address"], other.instance()["public_ip_address"]}
    assert not mine & theirs


@pytest.mark.parametrize(
    "args, message",
    [
        (["--instance", "projects/p/locations/r/clusters/c"], "invalid instance URI"),
        (["--backend", "nonsense"], "--backend"),
        (["--token", "=x"], "--token"),
    ],
)
def test_bad_command_line_is_one_clear_line(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fastproxy.emulator", *args],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        timeout=60,
    )
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigterm_exits_cleanly_and_removes_postgres(
    emulator_factory: Callable[..., EmulatorProcess],
) -> None:
    emu = emulator_factory("--token", "t=postgres")
    pid = emu.proc.pid
    assert emu.info["backend"]["kind"] == "postgres"
    assert emu.stop() == 0, emu.log_text()
    assert "Traceback" not in emu.log_text()
    # The throwaway server is gone: nothing accepts on its port any more.
    with pytest.raises(OSError):
        import socket

        socket.create_connection(("127.0.0.1", emu.info["backend"]["port"]), timeout=2).close()
    assert pid


# --- the happy path against a real PostgreSQL --------------------------------------------------


def test_db_native_select_and_one_megabyte_result(
    emulator_pg: EmulatorProcess, tmp_path: Path
) -> None:
    sock = _session(emulator_pg, tmp_path, "native-token", DB_NATIVE)
    conn = pg8000.native.Connection(
        user="postgres", password="postgres", database="postgres", sock=sock
    )
    try:
        assert conn.run("SELECT 1") == [[1]]
        rows = conn.run("SELECT repeat('x', 1024) FROM generate_series(1, 1024)")
        assert len(rows) == 1024 and all(r[0] == "x" * 1024 for r in rows)
    finally:
        conn.close()


def test_db_native_wrong_password_is_refused_by_postgres(
    emulator_pg: EmulatorProcess, tmp_path: Path
) -> None:
    sock = _session(emulator_pg, tmp_path, "native-token", DB_NATIVE)
    with pytest.raises(pg8000.native.DatabaseError, match="password authentication failed"):
        pg8000.native.Connection(user="postgres", password="nope", database="postgres", sock=sock)


def test_auto_iam_logs_in_without_password(emulator_pg: EmulatorProcess, tmp_path: Path) -> None:
    sock = _session(emulator_pg, tmp_path, "iam-token", AUTO_IAM)
    conn = pg8000.native.Connection(user="iam-sa@demo-project.iam", database="postgres", sock=sock)
    try:
        assert conn.run("SELECT current_user") == [["iam-sa@demo-project.iam"]]
    finally:
        conn.close()


def test_auto_iam_as_another_user_is_refused(emulator_pg: EmulatorProcess, tmp_path: Path) -> None:
    sock = _session(emulator_pg, tmp_path, "iam-token", AUTO_IAM)
    with pytest.raises(pg8000.native.DatabaseError, match="28000"):
        pg8000.native.Connection(user="postgres", database="postgres", sock=sock)


def test_iam_role_cannot_bypass_the_emulator(emulator_pg: EmulatorProcess) -> None:
    backend = emulator_pg.info["backend"]
    env = dict(os.environ, PGPASSWORD="", PGCONNECT_TIMEOUT="10")
    proc = subprocess.run(
        [
            "psql",
            "-w",
            f"host={backend['host']} port={backend['port']} user=iam-sa@demo-project.iam "
            "dbname=postgres sslmode=disable",
            "-c",
            "SELECT 1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "password" in proc.stderr


def test_certificate_without_exchange_goes_straight_to_postgres(
    emulator_pg: EmulatorProcess, tmp_path: Path
) -> None:
    admin = AdminClient(emulator_pg.admin_endpoint, "native-token")
    material = admin.issue(DEMO_URI, use_mdx=False, pkcs1=True)
    sock = connect(tls_context(material, tmp_path), emulator_pg.instance()["ip_address"])
    conn = pg8000.native.Connection(
        user="postgres", password="postgres", database="postgres", sock=sock
    )
    try:
        assert conn.run("SELECT 2") == [[2]]
    finally:
        conn.close()


def test_public_ip_serves_too(emulator_pg: EmulatorProcess, tmp_path: Path) -> None:
    admin = AdminClient(emulator_pg.admin_endpoint, "native-token")
    material = admin.issue(DEMO_URI)
    ip = emulator_pg.instance()["public_ip_address"]
    sock = connect(tls_context(material, tmp_path), ip)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == f"{emulator_pg.instance()['instance_uid']}.server.alloydb"
    sock.sendall(mdx_request("native-token", DB_NATIVE))
    assert read_mdx_response(sock) == (1, "")
    sock.close()


# --- refusals ----------------------------------------------------------------------------------


def test_tls12_client_is_refused(emulator_echo: EmulatorProcess, tmp_path: Path) -> None:
    material = AdminClient(emulator_echo.admin_endpoint, "echo-token").issue(DEMO_URI)
    with pytest.raises(ssl.SSLError):
        connect(tls_context(material, tmp_path, tls12=True), emulator_echo.instance()["ip_address"])


def _refused_after_handshake(sock: ssl.SSLSocket) -> None:
    """TLS 1.3: a refused client certificate surfaces on the client's first read (protocol §3.4)."""
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        sock.sendall(mdx_request("echo-token", DB_NATIVE))
        data = sock.recv(16)
        if not data:
            raise ConnectionError("closed")


def test_no_client_certificate_is_refused(emulator_echo: EmulatorProcess, tmp_path: Path) -> None:
    material = AdminClient(emulator_echo.admin_endpoint, "echo-token").issue(DEMO_URI)
    ctx = tls_context(None, tmp_path, ca_cert=material.ca_cert)
    try:
        sock = connect(ctx, emulator_echo.instance()["ip_address"])
    except (ssl.SSLError, OSError):
        return
    _refused_after_handshake(sock)


def test_expired_certificate_is_refused(
    emulator_factory: Callable[..., EmulatorProcess], tmp_path: Path
) -> None:
    emu = emulator_factory(
        "--backend", "echo", "--token", "t=u@example.com", "--cert-lifetime", "5"
    )
    material = AdminClient(emu.admin_endpoint, "t").issue(DEMO_URI)
    not_after = x509.load_pem_x509_certificate(material.chain[0].encode()).not_valid_after_utc
    while time.time() <= not_after.timestamp() + 1:
        time.sleep(0.2)  # waiting for a wall-clock expiry, not for a server
    try:
        sock = connect(tls_context(material, tmp_path), emu.instance()["ip_address"])
    except (ssl.SSLError, OSError):
        return
    _refused_after_handshake(sock)


def test_foreign_ca_certificate_is_refused(
    emulator_factory: Callable[..., EmulatorProcess], tmp_path: Path
) -> None:
    other_uri = "projects/demo-project/locations/us-central1/clusters/other/instances/o1"
    emu = emulator_factory(
        "--backend",
        "echo",
        "--token",
        "t=u@example.com",
        "--instance",
        DEMO_URI,
        "--instance",
        other_uri,
    )
    admin = AdminClient(emu.admin_endpoint, "t")
    mine = admin.issue(DEMO_URI)
    foreign = admin.issue(other_uri)
    # Trust the right server CA but present a client certificate from the other cluster.
    ctx = tls_context(foreign, tmp_path, ca_cert=mine.ca_cert)
    try:
        sock = connect(ctx, emu.instance(0)["ip_address"])
    except (ssl.SSLError, OSError):
        return
    _refused_after_handshake(sock)


def test_unknown_token_in_exchange_gets_error(
    emulator_echo: EmulatorProcess, tmp_path: Path
) -> None:
    material = AdminClient(emulator_echo.admin_endpoint, "echo-token").issue(DEMO_URI)
    sock = connect(tls_context(material, tmp_path), emulator_echo.instance()["ip_address"])
    sock.sendall(mdx_request("not-a-token", DB_NATIVE))
    code, error = read_mdx_response(sock)
    assert code == 2 and error
    assert sock.recv(1) == b""


def test_echo_backend_round_trip(emulator_echo: EmulatorProcess, tmp_path: Path) -> None:
    material = AdminClient(emulator_echo.admin_endpoint, "echo-token").issue(DEMO_URI)
    sock = connect(tls_context(material, tmp_path), emulator_echo.instance()["ip_address"])
    payload = os.urandom(1 << 20)
    sock.sendall(mdx_request("echo-token", AUTO_IAM) + payload[:1000])
    assert read_mdx_response(sock) == (1, "")
    sock.sendall(payload[1000:])
    assert recv_exactly(sock, len(payload)) == payload
    sock.close()


@pytest.mark.parametrize(
    "token, path, status, google_status",
    [
        (None, f"v1beta/{DEMO_URI}/connectionInfo", 401, "UNAUTHENTICATED"),
        ("nope", f"v1/{DEMO_URI}/connectionInfo", 401, "UNAUTHENTICATED"),
        ("forbidden-token", f"v1alpha/{DEMO_URI}/connectionInfo", 403, "PERMISSION_DENIED"),
        ("native-token", f"v1beta/{DEMO_CLUSTER}/instances/nope/connectionInfo", 404, "NOT_FOUND"),
    ],
)
def test_admin_api_errors(
    emulator_pg: EmulatorProcess, token: str | None, path: str, status: int, google_status: str
) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = requests.get(f"{emulator_pg.admin_endpoint}/{path}", headers=headers, timeout=30)
    assert resp.status_code == status
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.json()["error"]["status"] == google_status


def test_admin_api_bad_key_is_400(emulator_pg: EmulatorProcess) -> None:
    resp = AdminClient(emulator_pg.admin_endpoint, "native-token").generate(DEMO_CLUSTER, "junk")
    assert resp.status_code == 400
    assert resp.json()["error"]["status"] == "INVALID_ARGUMENT"


def test_fault_endpoint_makes_next_call_fail(emulator_echo: EmulatorProcess) -> None:
    r = requests.post(
        f"{emulator_echo.admin_endpoint}/_emulator/fail",
        json={"count": 2, "status": 503},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    admin = AdminClient(emulator_echo.admin_endpoint, "echo-token")
    assert admin.connection_info(DEMO_URI).status_code == 503
    assert admin.connection_info(DEMO_URI).status_code == 503
    assert admin.connection_info(DEMO_URI).status_code == 200
    state = requests.get(f"{emulator_echo.admin_endpoint}/_emulator/state", timeout=30).json()
    assert json.dumps(state)
