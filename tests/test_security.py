"""Security properties (issue 7), each checked on what the code really does:

* TLS 1.3 only and the server always verified: the ClientHello of every context fastproxy builds
  offers TLS 1.3 and nothing else, verification is on, and no flag, setting or parameter can turn
  it off;
* keys and certificates stay in memory: a refreshing proxy, run with an audit hook, opens no file
  for writing and leaves its temp directory and working directory empty;
* tokens and keys never leave the process: everything a debug-level run prints and every answer
  of its health, metrics and admin servers is scanned for them;
* loopback by default: every listening socket of a proxy with all its servers on is bound to a
  loopback address; a non-loopback ``--address`` is warned about once, on stderr;
* the dependency audit of ``scripts/check`` (``scripts/audit-deps``) fails on a reported
  vulnerability and skips, saying so, without a network.
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import os
import re
import socket
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization

from fastproxy.__main__ import build_parser
from fastproxy.config import env_names, layered_options
from fastproxy.emulator.pki import PKI
from fastproxy.instance_uri import InstanceURI
from fastproxy.keys import public_key_pem
from fastproxy.listener import Listener
from fastproxy.proxy import Proxy
from fastproxy.refresh import LazySource, RefreshingSource, _default_context_factory
from fastproxy.source import DialInfo, static_dial_info
from fastproxy.tls import TLSClientSession
from fastproxy.tlsctx import build_client_context
from tests.conftest import REPO, EmulatorProcess, echo_emulator, stop_process
from tests.e2e_support import DEMO_URI, write_static_info
from tests.fault_support import client_key, fake_dial_info
from tests.inproc_support import connect, echo, recv_eof, wait_until

SECRET = "tok-Sx9Q4mVb7Lk2Wp8Rz5Nh3Jd6"
UNKNOWN_SECRET = "tok-Unknown-Ax7Bc3De9Fg1Hi5"

# --- TLS 1.3 only, verification always on ---------------------------------------------------


def _client_hello(ctx: Any) -> bytes:
    session = TLSClientSession(ctx, "127.0.0.1")
    assert not session.do_handshake()
    return session.outgoing()


def _offered_versions(hello: bytes) -> tuple[int, list[int]]:
    """(legacy_version, supported_versions) of a ClientHello record."""
    assert hello[0] == 0x16 and hello[5] == 0x01, "not a ClientHello record"
    pos = 9
    legacy = int.from_bytes(hello[pos : pos + 2], "big")
    pos += 2 + 32
    pos += 1 + hello[pos]  # session id
    pos += 2 + int.from_bytes(hello[pos : pos + 2], "big")  # cipher suites
    pos += 1 + hello[pos]  # compression methods
    end = pos + 2 + int.from_bytes(hello[pos : pos + 2], "big")
    pos += 2
    while pos < end:
        ext = int.from_bytes(hello[pos : pos + 2], "big")
        size = int.from_bytes(hello[pos + 2 : pos + 4], "big")
        data = hello[pos + 4 : pos + 4 + size]
        if ext == 0x002B:  # supported_versions
            count = data[0]
            return legacy, [int.from_bytes(data[i : i + 2], "big") for i in range(1, count + 1, 2)]
        pos += 4 + size
    return legacy, []


def _contexts() -> dict[str, Any]:
    """Every way fastproxy builds a client context: static info, the refresher's factory."""
    info: DialInfo = fake_dial_info(5433)
    pki = PKI()
    cert = pki.sign_client_certificate(
        InstanceURI.parse(DEMO_URI).cluster_parent, public_key_pem(client_key()), 3600, True, "x"
    )
    private_pem = (
        client_key()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    doc = {
        "publicKey": public_key_pem(client_key()),
        "privateKey": private_pem,
        DEMO_URI: {
            "ipAddress": "127.0.0.1",
            "pemCertificateChain": cert.chain_pems,
            "caCert": cert.ca_cert_pem,
        },
    }
    static = static_dial_info(doc, InstanceURI.parse(DEMO_URI), exchange_token="t")
    return {
        "build_client_context": info.context,
        "static": static.context,
        "refresher": _default_context_factory(cert.chain_pems, client_key(), cert.ca_cert_pem),
    }


def test_every_client_context_offers_tls13_only_and_verifies_the_server() -> None:
    from OpenSSL import SSL

    for name, ctx in _contexts().items():
        legacy, versions = _offered_versions(_client_hello(ctx))
        assert versions == [0x0304], f"{name}: offers {[hex(v) for v in versions]}"
        assert legacy == 0x0303, name  # TLS 1.3's fixed legacy_version
        assert ctx.get_verify_mode() == SSL.VERIFY_PEER, name


_INSECURE = re.compile(r"insecure|verif|skip.?tls|no.?tls|ssl|tls|cert.?check|hostname", re.I)


def test_no_flag_setting_or_parameter_turns_verification_off() -> None:
    parser = build_parser()
    flags = [s for a in parser._actions for s in a.option_strings]
    assert flags and not [f for f in flags if _INSECURE.search(f)], flags
    names = [n for flag in layered_options(parser) for n in env_names(flag)]
    assert not [n for n in names if _INSECURE.search(n)], names
    for fn in (
        Proxy.__init__,
        Listener.tcp,
        static_dial_info,
        RefreshingSource.__init__,
        LazySource.__init__,
        build_client_context,
        TLSClientSession.__init__,
    ):
        params = [p for p in inspect.signature(fn).parameters if _INSECURE.search(p)]
        assert not params, f"{fn.__qualname__} takes {params}"
    assert not [f for f in DialInfo.__dataclass_fields__ if _INSECURE.search(f)]
    # Nothing in the proxy's own code asks OpenSSL not to verify.
    for path in (REPO / "fastproxy").glob("*.py"):
        text = path.read_text()
        assert "VERIFY_NONE" not in text and "CERT_NONE" not in text, path


# --- processes with an audit hook, their output and their listening sockets -------------------


@pytest.fixture(scope="module")
def secret_emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    tmp = tmp_path_factory.mktemp("security")
    yield from echo_emulator(tmp, f"{SECRET}=secret-user@example.com")


_AUDIT = r"""
import os, runpy, sys
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & _WRITE
        ):
            sys.stderr.write(f"AUDIT write-open {path!r}\n")
    elif event in ("tempfile.mkstemp", "tempfile.mkdtemp", "os.mkdir", "os.rename",
                   "os.replace", "os.link", "os.symlink", "shutil.copyfile", "os.truncate"):
        sys.stderr.write(f"AUDIT {event} {args!r}\n")
sys.addaudithook(hook)
sys.argv = ["fastproxy", *sys.argv[1:]]
runpy.run_module("fastproxy", run_name="__main__", alter_sys=True)
"""


class Proc:
    """A proxy process with stdout and stderr collected apart, on threads."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: Path = REPO):
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(cwd),
            env={**os.environ, **(env or {})},
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._drain, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()
        wait_until(
            lambda: "ready for new connections" in self.text() or self.proc.poll() is not None,
            "the proxy's ready line",
            timeout=60,
        )
        assert self.proc.poll() is None, self.text()

    @staticmethod
    def _drain(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def text(self) -> str:
        return "".join(self.out) + "".join(self.err)

    def port(self, pattern: str) -> int:
        m = re.search(pattern, self.text())
        assert m, self.text()
        return int(m.group(1))

    def stop(self) -> int:
        rc = stop_process(self.proc)
        for t in self._threads:
            t.join(timeout=10)
        return rc


def _proxy_argv(*args: str, audit: bool = False) -> list[str]:
    if audit:
        return [sys.executable, "-c", _AUDIT, *args]
    return [sys.executable, "-m", "fastproxy", *args]


def test_a_refresh_writes_no_file_anywhere(secret_emu: EmulatorProcess, tmp_path: Path) -> None:
    """Keys and certificates live in memory: a proxy that fetches certificates (the first
    refresh, then one forced by a CA change) opens no file for writing and creates nothing in
    its temp directory or its working directory."""
    tmpdir, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmpdir.mkdir()
    cwd.mkdir()
    proc = Proc(
        _proxy_argv(
            DEMO_URI, "--alloydbadmin-api-endpoint", secret_emu.admin_endpoint,
            "--token", SECRET, "--port", "0", "--debug-logs",
            audit=True,
        ),
        env={"TMPDIR": str(tmpdir), "PYTHONDONTWRITEBYTECODE": "1"},
        cwd=cwd,
    )  # fmt: skip
    try:
        port = proc.port(r"Listening on 127\.0\.0\.1:(\d+) ")
        with connect(port) as sock:
            echo(sock, b"first certificate")
        cluster = InstanceURI.parse(DEMO_URI).cluster_parent
        rotate = f"{secret_emu.admin_endpoint}/_emulator/rotate-ca"
        requests.post(rotate, json={"cluster": cluster}, timeout=30).raise_for_status()
        with connect(port) as sock:  # fails verification against the old CA: forces a refresh
            recv_eof(sock)
        wait_until(lambda: proc.text().count("refreshed ") >= 2, "the forced refresh")
        with connect(port) as sock:
            echo(sock, b"second certificate")
    finally:
        proc.stop()
    out = proc.text()
    assert "AUDIT" not in out, [ln for ln in out.splitlines() if "AUDIT" in ln]
    assert list(tmpdir.iterdir()) == [] and list(cwd.iterdir()) == []


def _get(url: str) -> str:
    r = requests.get(url, timeout=30)
    return f"{url} {r.status_code}\n{r.text}\n"


@pytest.mark.parametrize("path", ["admin-api", "admin-api-rejected-token", "static"])
def test_tokens_and_keys_are_in_no_log_response_or_error(
    secret_emu: EmulatorProcess, tmp_path: Path, path: str
) -> None:
    """A debug-level run with every server on: logs (stdout and stderr), /metrics, the health
    probes and every /debug/ page hold neither the token nor any part of a private key, on the
    happy path and on the error paths (an unknown instance, a rejected token)."""
    token = UNKNOWN_SECRET if path == "admin-api-rejected-token" else SECRET
    key_fragments: list[str] = []
    if path == "static":
        static = write_static_info(secret_emu, SECRET, tmp_path / "static.json")
        pem = json.loads(static.read_text())["privateKey"]
        key_fragments = [ln for ln in pem.splitlines() if ln and not ln.startswith("-----")]
        source = ["--static-connection-info", str(static), DEMO_URI]
    else:
        nope = DEMO_URI.rsplit("/", 1)[0] + "/nope"
        source = ["--alloydbadmin-api-endpoint", secret_emu.admin_endpoint, DEMO_URI, nope]
    proc = Proc(
        _proxy_argv(
            *source, "--token", token, "--port", "0", "--debug-logs",
            "--prometheus", "--health-check", "--http-port", "0",
            "--debug", "--quitquitquit", "--admin-port", "0",
        )
    )  # fmt: skip
    seen = []
    try:
        ports = [int(p) for p in re.findall(r"Listening on 127\.0\.0\.1:(\d+) ", proc.text())]
        http = proc.port(r"Health and metrics server listening on \S+:(\d+)")
        admin = proc.port(r"Enabling debug endpoints at localhost:(\d+)")
        for port in ports:
            with connect(port) as sock:
                try:  # an instance without connection info is closed at once, maybe first
                    sock.sendall(b"hello")
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                seen.append(recv_eof(sock).decode(errors="replace"))
        base, adm = f"http://127.0.0.1:{http}", f"http://127.0.0.1:{admin}"
        for url in (
            f"{base}/startup", f"{base}/readiness", f"{base}/liveness", f"{base}/metrics",
            f"{base}/nothing-here", f"{adm}/debug/", f"{adm}/debug/vars", f"{adm}/debug/threads",
            f"{adm}/debug/gc", f"{adm}/debug/tracemalloc", f"{adm}/debug/profile?seconds=1",
            f"{adm}/debug/nothing-here",
        ):  # fmt: skip
            seen.append(_get(url))
    finally:
        proc.stop()
    everything = proc.text() + "".join(seen)
    assert "/debug/vars 200" in everything and "fastproxy_connections_accepted_total" in everything
    if path != "static":
        # The error paths ran: the unknown instance (and, with the rejected token, every call).
        assert "instance not found" in everything or "HTTP 401" in everything, proc.text()
    assert token not in everything
    assert "PRIVATE KEY" not in everything and "BEGIN" not in everything
    for fragment in key_fragments:
        assert fragment not in everything


# --- loopback by default ----------------------------------------------------------------------


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket the process holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, v6 in ((f"/proc/{pid}/net/tcp", False), (f"/proc/{pid}/net/tcp6", True)):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                hexaddr, hexport = local.split(":")
                raw = bytes.fromhex(hexaddr)
                if v6:
                    raw = b"".join(struct.pack("<I", *struct.unpack(">I", raw[i : i + 4]))
                                   for i in range(0, 16, 4))  # fmt: skip
                    addr = str(ipaddress.IPv6Address(raw))
                else:
                    addr = str(ipaddress.IPv4Address(raw[::-1]))
                out.append((addr, int(hexport, 16)))
    return out


@pytest.mark.parametrize("address", [None, "0.0.0.0"], ids=["default", "all-interfaces"])
def test_listens_on_loopback_by_default_and_warns_otherwise(
    emulator_echo: EmulatorProcess, tmp_path: Path, address: str | None
) -> None:
    static = write_static_info(emulator_echo, "echo-token", tmp_path / "static.json")
    extra = ["--address", address] if address else []
    proc = Proc(
        _proxy_argv(
            DEMO_URI, "--static-connection-info", str(static), "--token", "echo-token",
            "--port", "0", *extra, "--prometheus", "--health-check", "--http-port", "0",
            "--debug", "--quitquitquit", "--admin-port", "0",
        )
    )  # fmt: skip
    try:
        port = proc.port(r"Listening on [\d.]+:(\d+) for")
        admin = proc.port(r"Enabling debug endpoints at localhost:(\d+)")
        http = proc.port(r"Health and metrics server listening on \S+:(\d+)")
        with connect(port) as sock:
            echo(sock, b"through whichever address")
        bound = _listening(proc.proc.pid)
    finally:
        proc.stop()
    ports = {p for _, p in bound}
    assert {port, admin, http} <= ports, bound
    for addr, p in bound:
        if p == port and address:
            assert addr == address
        else:
            assert ipaddress.ip_address(addr).is_loopback, f"{addr}:{p} is not loopback"
    warning = "Listening on 0.0.0.0, which is not a loopback address"
    stderr = "".join(proc.err)
    if address:
        assert stderr.count(warning) == 1, stderr
        assert warning not in "".join(proc.out), "the warning belongs on stderr"
    else:
        assert "not a loopback address" not in proc.text()


def test_unix_socket_is_mode_0777_as_documented(
    emulator_echo: EmulatorProcess, tmp_path: Path
) -> None:
    import shutil
    import tempfile

    static = write_static_info(emulator_echo, "echo-token", tmp_path / "static.json")
    sockdir = Path(tempfile.mkdtemp(prefix="fp-sec-", dir="/tmp"))  # paths are limited to 108 B
    try:
        proc = Proc(
            _proxy_argv(
                DEMO_URI, "--static-connection-info", str(static), "--token", "echo-token",
                "--unix-socket", str(sockdir),
            )
        )  # fmt: skip
        try:
            path = sockdir / InstanceURI.parse(DEMO_URI).socket_dir_name / ".s.PGSQL.5432"
            st = path.lstat()
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o777
        finally:
            proc.stop()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


# --- the dependency audit in scripts/check ------------------------------------------------------

AUDIT_SCRIPT = REPO / "scripts" / "audit-deps"


def _fake_pip_audit(tmp_path: Path, report: dict[str, Any] | None, stderr: str, rc: int) -> Path:
    fake = tmp_path / "pip-audit"
    out = json.dumps(report) if report is not None else ""
    fake.write_text(
        "#!/usr/bin/env python3\n"
        "import sys\n"
        "args = sys.argv[1:]\n"
        f"report = {out!r}\n"
        "if report and '-o' in args:\n"
        "    open(args[args.index('-o') + 1], 'w').write(report)\n"
        f"sys.stderr.write({stderr!r})\n"
        f"sys.exit({rc})\n"
    )
    fake.chmod(0o755)
    return fake


def _audit(tmp_path: Path, fake: Path, *, network: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PIP_AUDIT=str(fake))
    if not network:
        env["FASTPROXY_AUDIT_PROBE_URL"] = "http://127.0.0.1:9/"  # nothing listens there
    else:
        env["FASTPROXY_AUDIT_PROBE_URL"] = "skip"
    return subprocess.run(
        [sys.executable, str(AUDIT_SCRIPT)], capture_output=True, text=True, env=env, timeout=120
    )


def test_dependency_audit_fails_on_a_reported_vulnerability(tmp_path: Path) -> None:
    report = {
        "dependencies": [
            {"name": "requests", "version": "2.0.0", "vulns": [
                {"id": "PYSEC-0000-1", "fix_versions": ["2.31.0"], "description": "bad"}]},
            {"name": "idna", "version": "3.7", "vulns": []},
            {"name": "certifi", "skip_reason": "Dependency not found on PyPI"},
        ],
        "fixes": [],
    }  # fmt: skip
    result = _audit(tmp_path, _fake_pip_audit(tmp_path, report, "", 1))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "requests 2.0.0: PYSEC-0000-1" in result.stdout + result.stderr
    assert "audited 2" in result.stdout and "not audited 1: certifi" in result.stdout


def test_dependency_audit_passes_and_lists_what_it_could_not_audit(tmp_path: Path) -> None:
    report = {
        "dependencies": [
            {"name": "idna", "version": "3.7", "vulns": []},
            {"name": "certifi", "skip_reason": "Dependency not found on PyPI"},
        ],
        "fixes": [],
    }
    result = _audit(tmp_path, _fake_pip_audit(tmp_path, report, "", 0))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audited 1" in result.stdout and "not audited 1: certifi" in result.stdout
    assert "no known vulnerabilities" in result.stdout


def test_dependency_audit_without_network_is_skipped_with_a_clear_line(tmp_path: Path) -> None:
    fake = _fake_pip_audit(tmp_path, None, "ConnectionError: Failed to resolve 'pypi.org'\n", 1)
    result = _audit(tmp_path, fake, network=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped: no network" in result.stdout
    # pip-audit itself failing on the network mid-run is a skip too, not a failure.
    result = _audit(tmp_path, fake)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped: no network" in result.stdout


def test_dependency_audit_tool_error_is_a_failure(tmp_path: Path) -> None:
    fake = _fake_pip_audit(tmp_path, None, "ValueError: something else broke\n", 2)
    result = _audit(tmp_path, fake)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "something else broke" in result.stdout + result.stderr


def test_lock_file_pins_every_runtime_dependency() -> None:
    lock = (REPO / "requirements.lock").read_text().splitlines()
    pins = {
        ln.split("==")[0].lower().replace("_", "-"): ln.split("==")[1]
        for ln in lock
        if ln and not ln.startswith("#")
    }
    assert all(v for v in pins.values())
    for name in ("google-auth", "requests", "cryptography", "pyopenssl", "prometheus-client"):
        assert name in pins, f"{name} missing from requirements.lock"
