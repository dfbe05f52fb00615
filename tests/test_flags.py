"""The command line: every Auth Proxy flag, instance query options, and the usage errors.

The argument cases parse in-process with :func:`fastproxy.config.parse_layered` (no environment,
no file); the error cases run :func:`fastproxy.__main__.main` in-process with ``_serve`` replaced,
so nothing is ever bound, and a few run as real processes to prove exit code 1, one line on
stderr and no traceback. The last test keeps the README's flag table in step with the parser.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import fastproxy.__main__ as cli
from fastproxy.admin import DEFAULT_ENDPOINT
from fastproxy.config import env_names, parse_layered
from fastproxy.duration import parse_duration
from fastproxy.source import IPType

REPO = Path(__file__).resolve().parent.parent
U = "projects/proj/locations/region/clusters/clust/instances/inst"
U2 = "projects/proj/locations/region/clusters/clust2/instances/inst2"
SA = "sv1@developer.gserviceaccount.com"


def parse(*argv: str) -> argparse.Namespace:
    ns, _ = parse_layered(cli.build_parser(), list(argv), {})
    return ns


# --- argument cases ---------------------------------------------------------------------------

DEFAULTS: dict[str, Any] = {
    "instances": [U],
    "address": "127.0.0.1",
    "port": 5432,
    "unix_socket": None,
    "max_connections": 0,
    "workers": 1,
    "auto_iam_authn": False,
    "public_ip": False,
    "psc": False,
    "static_connection_info": None,
    "skip_metadata_exchange": False,
    "lazy_refresh": False,
    "run_connection_test": False,
    "dial_timeout": "30s",
    "alloydbadmin_api_endpoint": DEFAULT_ENDPOINT,
    "credentials_file": None,
    "json_credentials": None,
    "gcloud_auth": False,
    "token": None,
    "login_token": None,
    "impersonate_service_account": None,
    "quota_project": None,
    "user_agent": None,
    "config_file": None,
    "structured_logs": False,
    "debug_logs": False,
    "quiet": False,
    "health_check": False,
    "with_backend_check": False,
    "http_address": "localhost",
    "http_port": 9090,
    "prometheus": False,
    "prometheus_namespace": "",
    "quitquitquit": False,
    "debug": False,
    "admin_port": 9091,
    "min_sigterm_delay": "0s",
    "max_sigterm_delay": "0s",
    "exit_zero_sigterm": False,
    "fuse": None,
    "fuse_tmp_dir": None,
    "telemetry_project": None,
    "telemetry_prefix": None,
    "telemetry_sample_rate": None,
    "disable_traces": False,
    "disable_metrics": False,
    "disable_built_in_telemetry": False,
}

# (id, argv, the attributes that differ from DEFAULTS)
ARG_CASES: list[tuple[str, list[str], dict[str, Any]]] = [
    ("defaults", [U], {}),
    ("two-instances", [U, U2], {"instances": [U, U2]}),
    ("flags-after-instances", [U, "--port", "6000"], {"port": 6000}),
    ("double-dash", ["--", U], {}),
    ("address", ["--address", "0.0.0.0", U], {"address": "0.0.0.0"}),
    ("address-short", ["-a", "0.0.0.0", U], {"address": "0.0.0.0"}),
    ("address-equals", ["--address=::1", U], {"address": "::1"}),
    ("port", ["--port", "6000", U], {"port": 6000}),
    ("port-short", ["-p", "6000", U], {"port": 6000}),
    ("port-equals", ["--port=6000", U], {"port": 6000}),
    ("unix-socket", ["--unix-socket", "/path/to/dir/", U], {"unix_socket": "/path/to/dir/"}),
    ("unix-socket-short", ["-u", "/path/to/dir/", U], {"unix_socket": "/path/to/dir/"}),
    ("max-connections", ["--max-connections", "1", U], {"max_connections": 1}),
    ("workers", ["--workers", "4", U], {"workers": 4}),
    ("auto-iam-authn", ["--auto-iam-authn", U], {"auto_iam_authn": True}),
    ("auto-iam-authn-short", ["-i", U], {"auto_iam_authn": True}),
    ("public-ip", ["--public-ip", U], {"public_ip": True}),
    ("psc", ["--psc", U], {"psc": True}),
    (
        "static-connection-info",
        ["--static-connection-info", "myfile.json", U],
        {"static_connection_info": "myfile.json"},
    ),
    ("skip-metadata-exchange", ["--skip-metadata-exchange", U], {"skip_metadata_exchange": True}),
    ("lazy-refresh", ["--lazy-refresh", U], {"lazy_refresh": True}),
    ("run-connection-test", ["--run-connection-test", U], {"run_connection_test": True}),
    ("dial-timeout", ["--dial-timeout", "1m30s", U], {"dial_timeout": "1m30s"}),
    (
        "api-endpoint",
        ["--alloydbadmin-api-endpoint", "https://test.googleapis.com/", U],
        {"alloydbadmin_api_endpoint": "https://test.googleapis.com/"},
    ),
    (
        "credentials-file",
        ["--credentials-file", "/path/to/file", U],
        {"credentials_file": "/path/to/file"},
    ),
    ("credentials-file-short", ["-c", "/path/to/file", U], {"credentials_file": "/path/to/file"}),
    (
        "json-credentials",
        ["--json-credentials", '{"json":"goes-here"}', U],
        {"json_credentials": '{"json":"goes-here"}'},
    ),
    (
        "json-credentials-short",
        ["-j", '{"json":"goes-here"}', U],
        {"json_credentials": '{"json":"goes-here"}'},
    ),
    ("gcloud-auth", ["--gcloud-auth", U], {"gcloud_auth": True}),
    ("gcloud-auth-short", ["-g", U], {"gcloud_auth": True}),
    ("token", ["--token", "MYCOOLTOKEN", U], {"token": "MYCOOLTOKEN"}),
    ("token-short", ["-t", "MYCOOLTOKEN", U], {"token": "MYCOOLTOKEN"}),
    (
        "login-token-with-token",
        ["--auto-iam-authn", "--token", "T", "--login-token", "LT", U],
        {"auto_iam_authn": True, "token": "T", "login_token": "LT"},
    ),
    (
        "login-token-alone",
        ["--auto-iam-authn", "--login-token", "LT", U],
        {"auto_iam_authn": True, "login_token": "LT"},
    ),
    (
        "impersonate-service-account",
        ["--impersonate-service-account", SA, U],
        {"impersonate_service_account": SA},
    ),
    (
        "impersonation-chain",
        ["--impersonate-service-account", f"{SA},sv2@x.iam.gserviceaccount.com", U],
        {"impersonate_service_account": f"{SA},sv2@x.iam.gserviceaccount.com"},
    ),
    ("quota-project", ["--quota-project", "billing", U], {"quota_project": "billing"}),
    (
        "user-agent",
        ["--user-agent", "some-runtime/0.0.1", U],
        {"user_agent": "some-runtime/0.0.1"},
    ),
    ("structured-logs", ["--structured-logs", U], {"structured_logs": True}),
    ("structured-logs-short", ["-l", U], {"structured_logs": True}),
    ("debug-logs", ["--debug-logs", U], {"debug_logs": True}),
    ("quiet", ["--quiet", U], {"quiet": True}),
    ("health-check", ["--health-check", U], {"health_check": True}),
    ("with-backend-check", ["--with-backend-check", U], {"with_backend_check": True}),
    ("http-address", ["--http-address", "0.0.0.0", U], {"http_address": "0.0.0.0"}),
    ("http-port", ["--http-port", "5555", U], {"http_port": 5555}),
    ("prometheus", ["--prometheus", U], {"prometheus": True}),
    (
        "prometheus-namespace",
        ["--prometheus-namespace", "myns", U],
        {"prometheus_namespace": "myns"},
    ),
    ("quitquitquit", ["--quitquitquit", U], {"quitquitquit": True}),
    ("debug", ["--debug", U], {"debug": True}),
    ("admin-port", ["--admin-port", "7777", U], {"admin_port": 7777}),
    ("min-sigterm-delay", ["--min-sigterm-delay", "10s", U], {"min_sigterm_delay": "10s"}),
    ("max-sigterm-delay", ["--max-sigterm-delay", "10s", U], {"max_sigterm_delay": "10s"}),
    ("exit-zero-sigterm", ["--exit-zero-sigterm", U], {"exit_zero_sigterm": True}),
    ("exit-zero-on-sigterm", ["--exit-zero-on-sigterm", U], {"exit_zero_sigterm": True}),
    ("fuse-tmp-dir", ["--fuse-tmp-dir", "/mydir", U], {"fuse_tmp_dir": "/mydir"}),
    ("fuse", ["--fuse", "/mnt/alloydb"], {"fuse": "/mnt/alloydb", "instances": []}),
    (
        "telemetry-project",
        ["--telemetry-project", "mycoolproject", U],
        {"telemetry_project": "mycoolproject"},
    ),
    ("telemetry-prefix", ["--telemetry-prefix", "myprefix", U], {"telemetry_prefix": "myprefix"}),
    (
        "telemetry-sample-rate",
        ["--telemetry-sample-rate", "500", U],
        {"telemetry_sample_rate": 500},
    ),
    ("disable-traces", ["--disable-traces", U], {"disable_traces": True}),
    ("disable-metrics", ["--disable-metrics", U], {"disable_metrics": True}),
    (
        "disable-built-in-telemetry",
        ["--disable-built-in-telemetry", U],
        {"disable_built_in_telemetry": True},
    ),
    # pflag's boolean assignments: the last one wins.
    ("bool-equals-true", ["--debug=true", U], {"debug": True}),
    ("bool-equals-false", ["--debug=false", U], {}),
    ("bool-equals-1", ["--prometheus=1", U], {"prometheus": True}),
    ("bool-equals-F", ["--prometheus=F", U], {}),
    ("bool-short-equals-false", ["-g=false", U], {}),
    ("bool-short-equals-t", ["-i=t", U], {"auto_iam_authn": True}),
    ("bool-true-then-false", ["--debug", "--debug=false", U], {}),
    ("bool-false-then-true", ["--debug=false", "--debug", U], {"debug": True}),
    ("bool-alias-equals", ["--exit-zero-on-sigterm=TRUE", U], {"exit_zero_sigterm": True}),
    ("bool-after-double-dash-is-positional", ["--", U, "--debug=false"], {"instances": None}),
]


@pytest.mark.parametrize(
    ("argv", "changed"), [c[1:] for c in ARG_CASES], ids=[c[0] for c in ARG_CASES]
)
def test_argument(argv: list[str], changed: dict[str, Any]) -> None:
    want = {**DEFAULTS, **changed}
    if want["instances"] is None:  # everything after "--" is an instance argument
        want["instances"] = argv[argv.index("--") + 1 :]
    assert vars(parse(*argv)) == want


def test_every_flag_has_an_argument_case() -> None:
    """A new flag fails here until it gets a case above (and a row in the README table)."""
    used = {
        token.split("=")[0]
        for _, argv, _ in ARG_CASES
        for token in argv
        if token.startswith("--") and token != "--"
    }
    long_flags = {s for a in cli.build_parser()._actions for s in a.option_strings if s[:2] == "--"}
    assert long_flags - used == {"--help", "--version", "--config-file"}  # these: tests below
    shorts = {s for a in cli.build_parser()._actions for s in a.option_strings if s[:2] != "--"}
    used_short = {t.split("=")[0] for _, argv, _ in ARG_CASES for t in argv if t[:2] != "--"}
    assert shorts - used_short == {"-h", "-v"}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1m30s", 90.0), ("250ms", 0.25), ("1.5h", 5400.0), ("2h45m10s", 9910.0), ("0", 0.0)],
)
def test_durations_in_go_syntax(text: str, seconds: float) -> None:
    assert parse_duration(parse("--max-sigterm-delay", text, U).max_sigterm_delay) == seconds


# --- instance query options ------------------------------------------------------------------


@dataclass
class Expect:
    address: str | None = None
    port: int | None = None
    unix_socket: str | None = None
    unix_socket_path: str | None = None
    auto_iam: bool = False
    ip_type: str = IPType.PRIVATE
    flags: list[str] = field(default_factory=list)


QUERY_CASES: list[tuple[str, str, Expect]] = [
    ("none", U, Expect()),
    ("auto-iam-bare", f"{U}?auto-iam-authn", Expect(auto_iam=True)),
    ("auto-iam-t", f"{U}?auto-iam-authn=t", Expect(auto_iam=True)),
    ("auto-iam-f", f"{U}?auto-iam-authn=f", Expect()),
    ("auto-iam-true", f"{U}?auto-iam-authn=true", Expect(auto_iam=True)),
    ("auto-iam-false", f"{U}?auto-iam-authn=false", Expect()),
    ("auto-iam-TRUE", f"{U}?auto-iam-authn=TRUE", Expect(auto_iam=True)),
    ("auto-iam-False", f"{U}?auto-iam-authn=False", Expect()),
    ("auto-iam-false-beats-flag", f"{U}?auto-iam-authn=f", Expect(flags=["--auto-iam-authn"])),
    ("public-ip-bare", f"{U}?public-ip", Expect(ip_type=IPType.PUBLIC)),
    ("public-ip-T", f"{U}?public-ip=T", Expect(ip_type=IPType.PUBLIC)),
    ("public-ip-f", f"{U}?public-ip=f", Expect()),
    ("public-ip-true", f"{U}?public-ip=true", Expect(ip_type=IPType.PUBLIC)),
    ("public-ip-FALSE", f"{U}?public-ip=FALSE", Expect()),
    ("public-ip-flag", U, Expect(ip_type=IPType.PUBLIC, flags=["--public-ip"])),
    ("public-ip-false-beats-flag", f"{U}?public-ip=false", Expect(flags=["--public-ip"])),
    ("psc-bare", f"{U}?psc", Expect(ip_type=IPType.PSC)),
    ("psc-true", f"{U}?psc=true", Expect(ip_type=IPType.PSC)),
    ("psc-false", f"{U}?psc=false", Expect()),
    ("psc-flag", U, Expect(ip_type=IPType.PSC, flags=["--psc"])),
    ("psc-wins-over-public-ip", f"{U}?psc&public-ip", Expect(ip_type=IPType.PSC)),
    ("address", f"{U}?address=0.0.0.0", Expect(address="0.0.0.0")),
    ("address-ipv6", f"{U}?address=::1", Expect(address="::1")),
    ("port", f"{U}?port=6000", Expect(port=6000)),
    ("port-and-address", f"{U}?port=6000&address=10.0.0.1", Expect(port=6000, address="10.0.0.1")),
    ("unix-socket", f"{U}?unix-socket=/path/to/dir/", Expect(unix_socket="/path/to/dir/")),
    (
        "unix-socket-path",
        f"{U}?unix-socket-path=/path/to/file",
        Expect(unix_socket_path="/path/to/file"),
    ),
    (
        "impersonation-with-query",
        f"{U}?auto-iam-authn=true",
        Expect(auto_iam=True, flags=["--impersonate-service-account", SA]),
    ),
    (
        "all-booleans",
        f"{U}?auto-iam-authn=T&public-ip=t&port=7000",
        Expect(auto_iam=True, ip_type=IPType.PUBLIC, port=7000),
    ),
]


@pytest.mark.parametrize(
    ("arg", "want"), [c[1:] for c in QUERY_CASES], ids=[c[0] for c in QUERY_CASES]
)
def test_instance_query(arg: str, want: Expect) -> None:
    args = parse(*want.flags, arg)
    inst, query = cli.parse_instance_arg(args.instances[0])
    assert inst.uri.uri == U
    assert (inst.address, inst.port, inst.unix_socket, inst.unix_socket_path) == (
        want.address,
        want.port,
        want.unix_socket,
        want.unix_socket_path,
    )
    assert cli._flag(query, "auto-iam-authn", args.auto_iam_authn) is want.auto_iam
    assert cli._ip_type(query, args) == want.ip_type


def _plan(*argv: str) -> list[tuple[str, int] | str]:
    args = parse(*argv)
    parsed = [cli.parse_instance_arg(a) for a in args.instances]
    return [
        str(s.path) if s.path is not None else (s.host, s.port)
        for s in cli._listen_plan(args, parsed)
    ]


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        ([U, U2], [("127.0.0.1", 5432), ("127.0.0.1", 5433)]),
        (["-p", "6000", f"{U}?port=7000", U2], [("127.0.0.1", 7000), ("127.0.0.1", 6000)]),
        (["-p", "0", U, U2], [("127.0.0.1", 0), ("127.0.0.1", 0)]),
        ([f"{U}?address=10.0.0.1", U2], [("10.0.0.1", 5432), ("127.0.0.1", 5433)]),
        (
            ["-u", "/s", U, f"{U2}?port=6000"],
            ["/s/proj.region.clust.inst/.s.PGSQL.5432", ("127.0.0.1", 6000)],
        ),
        ([f"{U}?unix-socket=/d"], ["/d/proj.region.clust.inst/.s.PGSQL.5432"]),
        ([f"{U}?unix-socket-path=/run/pg/.s.PGSQL.5432"], ["/run/pg/.s.PGSQL.5432"]),
        ([f"{U}?unix-socket-path=/run/pg"], ["/run/pg/.s.PGSQL.5432"]),
    ],
    ids=[
        "consecutive",
        "query-port-keeps-sequence",
        "port-0",
        "query-address",
        "unix-dir-with-tcp-override",
        "query-unix-socket",
        "query-unix-socket-path",
        "query-unix-socket-path-dir",
    ],
)
def test_listen_plan(argv: list[str], want: list[Any]) -> None:
    assert _plan(*argv) == want


# --- usage errors ----------------------------------------------------------------------------


@dataclass
class Run:
    code: int
    out: str
    err: str
    served: list[tuple[argparse.Namespace, set[str], Any, Any]]


@pytest.fixture
def run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Callable[..., Run]]:
    """``main(argv)`` in-process: no logging set-up, no rlimit change, and ``_serve`` records
    what it would have served instead of binding anything."""
    for name in list(os.environ):
        if name.startswith(("ALLOYDB_PROXY_", "FASTPROXY_")):
            monkeypatch.delenv(name)
    served: list[tuple[argparse.Namespace, set[str], Any, Any]] = []

    def fake_serve(args: argparse.Namespace, explicit: set[str], parsed: Any, timing: Any) -> int:
        served.append((args, explicit, parsed, timing))
        return 0

    monkeypatch.setattr(cli, "_serve", fake_serve)
    monkeypatch.setattr(cli, "setup_logging", lambda **kw: None)
    monkeypatch.setattr(cli, "raise_nofile_limit", lambda: None)

    def run(*argv: str) -> Run:
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err, list(served))

    yield run


def _one_line_error(run: Run, needle: str) -> None:
    assert run.code == 1, run
    assert not run.served, "validation passed and the proxy would have started"
    lines = run.err.splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith("fastproxy: error: "), lines[0]
    assert needle in lines[0], lines[0]


ERROR_CASES: list[tuple[str, list[str], str]] = [
    ("no-instance", [], "missing instance URI"),
    ("bogus-uri", ["projects/proj/locations/region/clusters/clust/"], "invalid instance URI"),
    ("bogus-query-key", [f"{U}?%=foo"], 'malformed option "%=foo"'),
    ("empty-query", [f"{U}?"], "empty option list after '?'"),
    ("stray-ampersand", [f"{U}?port=1&"], "stray '&'"),
    ("unknown-query-key", [f"{U}?bogus=1"], "unknown option ?bogus="),
    ("empty-address-query", [f"{U}?address="], "?address= for proj.region.clust.inst is not"),
    ("bad-address-flag", ["--address", "bogus", U], "--address is not a valid IP address"),
    ("non-ip-address-query", [f"{U}?address=世界"], "not a valid IP address: '世界'"),
    (
        "duplicate-address-query",
        [f"{U}?address=0.0.0.0&address=1.1.1.1&address=2.2.2.2"],
        "option 'address' given more than once",
    ),
    ("two-question-marks", [f"{U}?address=1.1.1.1?foo=2.2.2.2"], "more than one '?'"),
    ("duplicate-port-query", [f"{U}?port=1&port=2"], "option 'port' given more than once"),
    ("port-query-not-a-number", [f"{U}?port=hi"], "invalid ?port= for proj.region.clust.inst"),
    ("port-query-out-of-range", [f"{U}?port=70000"], "invalid ?port="),
    ("bad-auto-iam-query", [f"{U}?auto-iam-authn=yes"], "invalid value for ?auto-iam-authn="),
    ("bad-public-ip-query", [f"{U}?public-ip=2"], "invalid value for ?public-ip="),
    ("bad-psc-query", [f"{U}?psc=nope"], "invalid value for ?psc="),
    (
        "token-and-credentials-file",
        ["--token", "my-token", "--credentials-file", "/path/to/file", U],
        "cannot specify --token and --credentials-file flags at the same time",
    ),
    (
        "token-and-gcloud-auth",
        ["--token", "my-token", "--gcloud-auth", U],
        "cannot specify --token and --gcloud-auth flags at the same time",
    ),
    (
        "gcloud-auth-and-credentials-file",
        ["--gcloud-auth", "--credentials-file", "/path/to/file", U],
        "cannot specify --credentials-file and --gcloud-auth flags at the same time",
    ),
    (
        "token-and-json-credentials",
        ["--token", "a-token", "--json-credentials", '{"json":"here"}', U],
        "cannot specify --json-credentials and --token flags at the same time",
    ),
    (
        "credentials-file-and-json",
        ["--credentials-file", "/a/file", "--json-credentials", '{"json":"here"}', U],
        "cannot specify --json-credentials and --credentials-file flags at the same time",
    ),
    (
        "gcloud-auth-and-json",
        ["-g", "-j", '{"json":"here"}', U],
        "cannot specify --json-credentials and --gcloud-auth flags at the same time",
    ),
    (
        "credentials-conflict-with-static-info",
        ["--static-connection-info", "/nonexistent.json", "-t", "t", "-c", "/f", U],
        "cannot specify --token and --credentials-file",
    ),
    (
        "bad-impersonation-chain",
        ["--impersonate-service-account", f"{SA},,x@y", U],
        "invalid --impersonate-service-account",
    ),
    (
        "duplicate-unix-socket-query",
        [f"{U}?unix-socket=/one&unix-socket=/two"],
        "option 'unix-socket' given more than once",
    ),
    (
        "unix-socket-with-address",
        ["-u", "/path/to/dir/", "-a", "127.0.0.1", U],
        "cannot specify --unix-socket and --address together",
    ),
    (
        "unix-socket-with-port",
        ["-u", "/path/to/dir/", "-p", "5432", U],
        "cannot specify --unix-socket and --port together",
    ),
    (
        "unix-socket-and-path-query",
        [f"{U}?unix-socket=/path&unix-socket-path=/another/path"],
        "cannot specify both unix-socket-path and unix-socket query params",
    ),
    (
        "unix-socket-path-and-address-query",
        [f"{U}?unix-socket-path=/path&address=127.0.0.1"],
        "cannot specify both address and unix-socket-path query params",
    ),
    (
        "unix-socket-path-and-port-query",
        [f"{U}?unix-socket-path=/path&port=5000"],
        "cannot specify both port and unix-socket-path query params",
    ),
    (
        "unix-socket-and-address-query",
        [f"{U}?unix-socket=/path&address=127.0.0.1"],
        "cannot specify both address and unix-socket query params",
    ),
    (
        "unix-socket-and-port-query",
        [f"{U}?unix-socket=/path&port=5000"],
        "cannot specify both port and unix-socket query params",
    ),
    ("empty-unix-socket-query", [f"{U}?unix-socket="], "?unix-socket= for proj.region"),
    ("unknown-flag", ["--host", "https://invalid:url[/]", U], "unrecognized arguments: --host"),
    ("abbreviated-flag", ["--tok", "t", U], "unrecognized arguments: --tok"),
    ("fuse", ["--fuse", "/mnt/alloydb"], "--fuse is not supported"),
    ("fuse-with-connection-test", ["--run-connection-test", "--fuse", "d"], "--fuse is not"),
    ("bad-int", ["--port", "abc", U], "argument --port/-p: invalid int value: 'abc'"),
    ("port-out-of-range", ["--port", "70000", U], "--port must be a port number (0-65535)"),
    ("ports-run-out", ["--port", "65535", U, U2], "no port left for " + U2),
    ("http-port-out-of-range", ["--http-port", "70000", U], "--http-port must be a port number"),
    ("admin-port-negative", ["--admin-port", "-1", U], "--admin-port must be a port number"),
    ("duration-without-unit", ["--dial-timeout", "30", U], "invalid duration '30'"),
    ("bad-duration", ["--max-sigterm-delay", "10 seconds", U], "invalid duration '10 seconds'"),
    ("negative-delay", ["--min-sigterm-delay=-1s", U], "invalid duration '-1s'"),
    ("zero-dial-timeout", ["--dial-timeout", "0", U], "--dial-timeout must be positive"),
    ("workers-zero", ["--workers", "0", U], "--workers must be at least 1"),
    ("max-connections-negative", ["--max-connections", "-1", U], "--max-connections must not"),
    (
        "skip-metadata-exchange-alone",
        ["--skip-metadata-exchange", U],
        "--skip-metadata-exchange needs --static-connection-info",
    ),
    ("bad-bool-value", ["--debug=maybe", U], "invalid value for --debug: 'maybe'"),
    ("bad-sample-rate", ["--telemetry-sample-rate", "often", U], "invalid int value"),
    (
        "bad-api-endpoint",
        ["--alloydbadmin-api-endpoint", "not a url", U],
        "invalid Admin API endpoint 'not a url'",
    ),
    (
        "config-file-extension",
        ["--config-file", "/etc/fastproxy.ini", U],
        "config file /etc/fastproxy.ini should have extension of toml, yaml, or json",
    ),
    (
        "config-file-missing",
        ["--config-file", "/nonexistent/fastproxy.toml", U],
        "cannot read config file /nonexistent/fastproxy.toml: No such file or directory",
    ),
]


@pytest.mark.parametrize(
    ("argv", "needle"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_usage_error(run_main: Callable[..., Run], argv: list[str], needle: str) -> None:
    _one_line_error(run_main(*argv), needle)


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("c.toml", "port = [", "failed to load configuration from"),
        ("c.json", "{", "failed to load configuration from"),
        ("c.yaml", "port: [1, 2", "failed to load configuration from"),
        ("c.toml", "bogus = 1", "unknown key 'bogus'"),
        ("c.json", '{"port": "abc"}', "key 'port': 'abc' (want an integer)"),
        ("c.yaml", "- a\n- b\n", "expected a table/mapping of flag names"),
    ],
    ids=["toml-malformed", "json-malformed", "yaml-malformed", "unknown-key", "bad-value", "list"],
)
def test_config_file_errors(
    run_main: Callable[..., Run], tmp_path: Path, name: str, content: str, needle: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    _one_line_error(run_main("--config-file", str(path), U), needle)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"ALLOYDB_PROXY_PORT": "abc"}, "invalid value for ALLOYDB_PROXY_PORT: 'abc'"),
        ({"FASTPROXY_DEBUG": "maybe"}, "invalid value for FASTPROXY_DEBUG: 'maybe'"),
        ({"ALLOYDB_PROXY_ADDRESS": "bogus"}, "--address is not a valid IP address"),
        (
            {"ALLOYDB_PROXY_UNIX_SOCKET": "/tmp/s", "ALLOYDB_PROXY_PORT": "6000"},
            "cannot specify --unix-socket and --port together",
        ),
        ({"ALLOYDB_PROXY_INSTANCE_URI": "nope"}, "invalid instance URI"),
    ],
    ids=["bad-int", "bad-bool", "bad-address", "unix-socket-and-port", "bad-instance"],
)
def test_environment_errors(
    run_main: Callable[..., Run],
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    needle: str,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = [] if "ALLOYDB_PROXY_INSTANCE_URI" in env else [U]
    _one_line_error(run_main(*argv), needle)


def test_validation_passes_to_serve(run_main: Callable[..., Run]) -> None:
    """The other side of the error cases: a full valid command line reaches ``_serve``."""
    run = run_main(
        "--port", "6000", "--dial-timeout", "1m30s", "--min-sigterm-delay", "250ms",
        "--max-sigterm-delay", "1.5h", "--alloydbadmin-api-endpoint", "https://test.example/",
        "--fuse-tmp-dir", "/ignored", f"{U}?port=7000&auto-iam-authn", U2,
    )  # fmt: skip
    assert (run.code, run.err) == (0, "")
    [(args, explicit, parsed, timing)] = run.served
    assert (timing.dial, timing.min_sigterm, timing.max_sigterm) == (90.0, 0.25, 5400.0)
    assert args.alloydbadmin_api_endpoint == "https://test.example"  # trailing '/' trimmed
    assert {"port", "dial_timeout", "alloydbadmin_api_endpoint"} <= explicit
    assert [inst.port for inst, _ in parsed] == [7000, None]


@pytest.mark.parametrize(
    ("argv", "logged", "not_logged"),
    [
        (["--telemetry-project", "p", U], "Ignoring the telemetry flags", None),
        (["--fuse-tmp-dir", "/d", U], "Ignoring --fuse-tmp-dir", None),
        (["--http-port", "9999", U], "Ignoring --http-port because", None),
        (["--alloydbadmin-api-endpoint", "http://e/", U], "Using API Endpoint http://e", None),
        (["-a", "0.0.0.0", U], "Listening on 0.0.0.0, which is not a loopback address", None),
        # Said once, where it applies (credentials.notices on the Admin API path); the static
        # path uses the login token whatever --auto-iam-authn says.
        (["--login-token", "LT", U], None, "Ignoring --login-token"),
        (["--prometheus", U], None, "Ignoring"),
    ],
    ids=["telemetry", "fuse-tmp-dir", "http-port", "endpoint", "non-loopback", "login", "none"],
)
def test_notices(
    run_main: Callable[..., Run],
    caplog: pytest.LogCaptureFixture,
    argv: list[str],
    logged: str | None,
    not_logged: str | None,
) -> None:
    with caplog.at_level("INFO", logger="fastproxy"):
        run = run_main(*argv)
    assert (run.code, run.err) == (0, "")
    if logged is not None:
        assert sum(logged in r.getMessage() for r in caplog.records) == 1, caplog.text
    if not_logged is not None:
        assert not_logged not in caplog.text


# --- real processes: exit code 1, one line, no traceback -----------------------------------


def _run_process(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("ALLOYDB_PROXY_", "FASTPROXY_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "fastproxy", *argv],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        env={**clean, **(env or {})},
        timeout=60,
    )


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--bogus", U], {}, "unrecognized arguments: --bogus"),
        (["-g", "-c", "/f", U], {}, "cannot specify --credentials-file and --gcloud-auth"),
        ([U], {"ALLOYDB_PROXY_PORT": "abc"}, "invalid value for ALLOYDB_PROXY_PORT"),
        (["--config-file", "/nonexistent/x.yaml", U], {}, "cannot read config file"),
        (["--port", "65535", U, U2], {}, "no port left"),
        ([f"{U}?psc=maybe"], {}, "invalid value for ?psc="),
    ],
    ids=["unknown-flag", "credentials", "env", "config-file", "ports-run-out", "query"],
)
def test_usage_error_process(argv: list[str], env: dict[str, str], needle: str) -> None:
    proc = _run_process(*argv, env=env)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fastproxy: error: ") and needle in lines[0], lines[0]


# --- the README's flag table -----------------------------------------------------------------

STATUSES = {"implemented", "accepted, no effect", "not supported"}


def _flags_section() -> dict[str, list[list[str]]]:
    """The README's "## Flags" section: subsection title -> its table rows for flags."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"^## Flags\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md has no '## Flags' section"
    tables: dict[str, list[list[str]]] = {}
    title = ""
    for line in m.group(1).splitlines():
        if line.startswith("### "):
            title = line[4:].strip()
        elif line.startswith("| `--"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            tables.setdefault(title, []).append(cells)
    return tables


def test_readme_flag_table_matches_the_parser() -> None:
    parser = cli.build_parser()
    actions = {s: a for a in parser._actions for s in a.option_strings}
    listed: list[str] = []
    for rows in _flags_section().values():
        for flag_cell, short, _default, env, status, _notes in rows:
            longs = re.findall(r"`(--[a-z0-9-]+)`", flag_cell)
            assert longs, flag_cell
            listed += longs
            action = actions.get(longs[0])
            assert action is not None, f"README lists {longs[0]}, which the parser does not know"
            assert set(longs) == {s for s in action.option_strings if s[:2] == "--"}, flag_cell
            want_short = [s for s in action.option_strings if s[:2] != "--"]
            assert re.findall(r"`(-[a-z])`", short) == want_short, (flag_cell, short)
            assert status in STATUSES, (flag_cell, status)
            if longs[0] in ("--help", "--version"):
                assert env == "", flag_cell
            else:
                assert env == f"`{env_names(longs[0][2:])[0]}`", (flag_cell, env)
    assert len(listed) == len(set(listed)), "a flag is listed twice"
    assert set(listed) == {s for s in actions if s[:2] == "--"}


def test_readme_flag_totals() -> None:
    """The totals sentence counts the Auth Proxy table's statuses."""
    rows = _flags_section()["The Auth Proxy's flags"]
    counts = {status: sum(1 for r in rows if r[4] == status) for status in STATUSES}
    text = (REPO / "README.md").read_text()
    m = re.search(
        r"Totals: (\d+) Auth Proxy flags: (\d+) implemented, (\d+) accepted without effect, "
        r"(\d+) not supported\s+\(`--fuse`\), (\d+) missing\.",
        text,
    )
    assert m, "README.md has no totals sentence"
    total, implemented, no_effect, unsupported, missing = map(int, m.groups())
    assert total == len(rows) == 44  # the Auth Proxy's flags, --help and --version included
    assert (implemented, no_effect, unsupported, missing) == (
        counts["implemented"],
        counts["accepted, no effect"],
        counts["not supported"],
        0,
    )
