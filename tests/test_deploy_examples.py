"""The deployment examples in deploy/ (and the README's copies of them) say what fastproxy does:
their flags parse with fastproxy's own parser, probes point at its health server's defaults, and
stop timeouts outlast its drain."""

from __future__ import annotations

import argparse
import configparser
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from fastproxy.__main__ import build_parser
from fastproxy.duration import parse_duration
from fastproxy.instance_uri import InstanceURI
from tests.conftest import REPO

yaml = pytest.importorskip("yaml")

SIDECAR = REPO / "deploy" / "kubernetes-sidecar.yaml"
UNIT = REPO / "deploy" / "fastproxy.service"
README = REPO / "README.md"


def _parse_proxy_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    assert args.instances, argv
    for uri in args.instances:
        InstanceURI.parse(uri.partition("?")[0])
    return args


def _default(dest: str) -> Any:
    return build_parser().get_default(dest)


def _drain_seconds(args: argparse.Namespace) -> float:
    return parse_duration(args.min_sigterm_delay) + parse_duration(args.max_sigterm_delay)


# --- the README ----------------------------------------------------------------------------------


def _deployment_section() -> str:
    text = README.read_text()
    m = re.search(r"^## Deployment\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, "README.md has no '## Deployment' section"
    return m.group(1)


@pytest.mark.parametrize(("path", "lang"), [(SIDECAR, "yaml"), (UNIT, "ini")], ids=["k8s", "unit"])
def test_readme_blocks_equal_the_files(path: Path, lang: str) -> None:
    blocks = re.findall(rf"^```{lang}\n(.*?)^```$", _deployment_section(), re.M | re.S)
    assert path.read_text() in blocks, f"the README's {lang} block differs from {path.name}"


# --- Kubernetes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pod() -> dict[str, Any]:
    doc = yaml.safe_load(SIDECAR.read_text())
    assert doc["kind"] in ("Pod", "Deployment")
    spec: dict[str, Any] = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in pod.get("initContainers", []) if "fastproxy" in c.get("command", [])]
    assert len(found) == 1, "one init container running fastproxy"
    return dict(found[0])


@pytest.fixture(scope="module")
def sidecar_args(sidecar: dict[str, Any]) -> argparse.Namespace:
    assert sidecar["command"] == ["fastproxy"]
    return _parse_proxy_args(list(sidecar["args"]))


def test_sidecar_is_a_native_sidecar(sidecar: dict[str, Any], pod: dict[str, Any]) -> None:
    assert sidecar["restartPolicy"] == "Always"
    assert all(c["name"] != sidecar["name"] for c in pod["containers"])


def test_sidecar_flags(sidecar_args: argparse.Namespace) -> None:
    assert sidecar_args.health_check
    assert sidecar_args.http_address == "0.0.0.0"  # the kubelet probes the Pod's IP
    assert sidecar_args.quitquitquit
    assert sidecar_args.admin_port == _default("admin_port") == 9091  # `fastproxy shutdown`


def test_sidecar_probes(sidecar: dict[str, Any], sidecar_args: argparse.Namespace) -> None:
    assert sidecar_args.http_port == _default("http_port") == 9090
    for probe, path in (
        ("startupProbe", "/startup"),
        ("livenessProbe", "/liveness"),
        ("readinessProbe", "/readiness"),
    ):
        get = sidecar[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, 9090), probe
    assert [p["containerPort"] for p in sidecar.get("ports", [])] in ([], [9090])


def test_sidecar_prestop_shuts_the_proxy_down(sidecar: dict[str, Any]) -> None:
    assert sidecar["lifecycle"]["preStop"]["exec"]["command"] == ["fastproxy", "shutdown"]


def test_sidecar_grace_period_outlasts_the_drain(
    pod: dict[str, Any], sidecar_args: argparse.Namespace
) -> None:
    assert parse_duration(sidecar_args.max_sigterm_delay) > 0
    assert pod["terminationGracePeriodSeconds"] > _drain_seconds(sidecar_args)


def test_sidecar_resources_and_security(sidecar: dict[str, Any], pod: dict[str, Any]) -> None:
    requests = sidecar["resources"]["requests"]
    assert requests.get("cpu") and requests.get("memory")
    ctx = {**pod.get("securityContext", {}), **sidecar.get("securityContext", {})}
    assert ctx.get("runAsNonRoot") is True
    assert sidecar.get("securityContext", {}).get("allowPrivilegeEscalation") is False


def test_app_connects_to_the_proxy(pod: dict[str, Any], sidecar_args: argparse.Namespace) -> None:
    (app,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in app.get("env", [])}
    assert env["PGHOST"] == sidecar_args.address == "127.0.0.1"
    assert int(env["PGPORT"]) == sidecar_args.port == _default("port") == 5432
    assert env.get("PGSSLMODE") == "disable"  # plaintext to the proxy, which does the TLS


# --- systemd -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    # strict=False: systemd allows a key more than once; no interpolation: '%' is systemd's.
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(UNIT.read_text())
    return cp


@pytest.fixture(scope="module")
def unit_args(unit: configparser.ConfigParser) -> argparse.Namespace:
    # systemd joins lines ending in a backslash; configparser keeps the indented continuation.
    exec_start = unit["Service"]["ExecStart"].replace("\\\n", " ")
    argv = shlex.split(exec_start)
    assert argv[0] == "/usr/local/bin/fastproxy"
    return _parse_proxy_args(argv[1:])


def _systemd_seconds(value: str) -> float:
    return float(value) if value.isdigit() else parse_duration(value)


def test_unit_service(unit: configparser.ConfigParser, unit_args: argparse.Namespace) -> None:
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert unit_args.health_check
    assert _systemd_seconds(service["TimeoutStopSec"]) > _drain_seconds(unit_args)
    assert parse_duration(unit_args.max_sigterm_delay) > 0
    if not unit_args.exit_zero_sigterm:  # 143 after SIGTERM must not count as a failure
        assert "143" in service.get("SuccessExitStatus", "").split()


def test_unit_hardening(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert service["NoNewPrivileges"] == "yes"
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    assert service["ProtectSystem"] == "strict"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
