"""fastproxy.source: the static connection-info file and the DialInfo built from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fastproxy.errors import ConfigError
from fastproxy.instance_uri import InstanceURI
from fastproxy.mdx import AuthType
from fastproxy.source import (
    SERVER_PORT,
    USER_AGENT,
    StaticSource,
    load_static_file,
    static_dial_info,
)
from tests.conftest import EmulatorProcess
from tests.e2e_support import DEMO_URI
from tests.inproc_support import echo_static_data

URI = InstanceURI.parse(DEMO_URI)


@pytest.fixture
def data(emulator_echo: EmulatorProcess) -> dict[str, Any]:
    return echo_static_data(emulator_echo)


def _write(path: Path, content: str) -> Path:
    path.write_text(content)
    return path


# --- load_static_file -----------------------------------------------------------------------------


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=f"cannot read static connection info {path}: "):
        load_static_file(path)


def test_load_bad_json(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.json", "{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_static_file(path)


def test_load_not_an_object(tmp_path: Path) -> None:
    path = _write(tmp_path / "list.json", "[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_static_file(path)


@pytest.mark.parametrize("key", ["privateKey", "publicKey"])
def test_load_missing_key(tmp_path: Path, key: str) -> None:
    doc = {"privateKey": "x", "publicKey": "y"}
    del doc[key]
    path = _write(tmp_path / "s.json", json.dumps(doc))
    with pytest.raises(ConfigError, match=f"missing '{key}'"):
        load_static_file(path)


def test_load_good_file(tmp_path: Path, data: dict[str, Any]) -> None:
    path = _write(tmp_path / "s.json", json.dumps(data))
    assert load_static_file(path) == data


# --- static_dial_info: addresses ------------------------------------------------------------------


def test_private_ip_by_default(data: dict[str, Any]) -> None:
    info = static_dial_info(data, URI, exchange_token="t")
    assert info.address == data[DEMO_URI]["ipAddress"]
    assert info.port == SERVER_PORT == 5433
    assert info.instance == URI.short
    assert info.user_agent == USER_AGENT


def test_public_ip(data: dict[str, Any]) -> None:
    info = static_dial_info(data, URI, public_ip=True, exchange_token="t")
    assert info.address == data[DEMO_URI]["publicIpAddress"]
    assert info.address != data[DEMO_URI]["ipAddress"]


def test_psc_wins_over_public_and_loses_its_trailing_dot(data: dict[str, Any]) -> None:
    psc_name = data[DEMO_URI]["pscInstanceConfig"]["pscDnsName"]
    assert psc_name.endswith(".")
    for public in (False, True):
        info = static_dial_info(data, URI, psc=True, public_ip=public, exchange_token="t")
        assert info.address == psc_name[:-1]


@pytest.mark.parametrize(
    ("flags", "remove", "ip_type"),
    [
        ({}, "ipAddress", "PRIVATE"),
        ({"public_ip": True}, "publicIpAddress", "PUBLIC"),
        ({"psc": True}, "pscInstanceConfig", "PSC"),
    ],
)
def test_missing_ip_type(
    data: dict[str, Any], flags: dict[str, bool], remove: str, ip_type: str
) -> None:
    del data[DEMO_URI][remove]
    with pytest.raises(ConfigError, match=f'instance does not have IP of type "{ip_type}"'):
        static_dial_info(data, URI, exchange_token="t", **flags)


def test_empty_address_counts_as_missing(data: dict[str, Any]) -> None:
    data[DEMO_URI]["publicIpAddress"] = ""
    with pytest.raises(ConfigError, match='instance does not have IP of type "PUBLIC"'):
        static_dial_info(data, URI, public_ip=True, exchange_token="t")


def test_no_entry_for_the_instance(data: dict[str, Any]) -> None:
    other = InstanceURI.parse(DEMO_URI.replace("demo-primary", "other"))
    with pytest.raises(ConfigError, match="has no entry for instance"):
        static_dial_info(data, other, exchange_token="t")


# --- static_dial_info: credentials and exchange ---------------------------------------------------


def test_token_required_when_the_exchange_is_on(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="needs an OAuth2 token"):
        static_dial_info(data, URI)
    info = static_dial_info(data, URI, metadata_exchange=False)
    assert info.metadata_exchange is False and info.exchange_token == ""


def test_auth_types(data: dict[str, Any]) -> None:
    native = static_dial_info(data, URI, exchange_token="tok")
    iam = static_dial_info(data, URI, exchange_token="tok", auto_iam_authn=True)
    assert native.auth_type is AuthType.DB_NATIVE
    assert iam.auth_type is AuthType.AUTO_IAM
    assert native.metadata_exchange and native.exchange_token == "tok"


def test_expires_at_is_the_leaf_not_after(data: dict[str, Any]) -> None:
    info = static_dial_info(data, URI, exchange_token="t")
    leaf = x509.load_pem_x509_certificate(data[DEMO_URI]["pemCertificateChain"][0].encode())
    assert info.expires_at == leaf.not_valid_after_utc.timestamp()


def test_each_dial_info_gets_a_new_generation(data: dict[str, Any]) -> None:
    a = static_dial_info(data, URI, exchange_token="t")
    b = static_dial_info(data, URI, exchange_token="t")
    assert b.generation > a.generation
    assert a.context is not b.context


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("pemCertificateChain", [], "bad pemCertificateChain"),
        ("pemCertificateChain", "not a list", "bad pemCertificateChain"),
        ("pemCertificateChain", ["garbage"], "static connection info for"),
        ("caCert", None, "missing caCert"),
        ("caCert", "garbage", "static connection info for"),
    ],
)
def test_bad_certificates(data: dict[str, Any], field: str, value: object, message: str) -> None:
    data[DEMO_URI][field] = value
    with pytest.raises(ConfigError, match=message):
        static_dial_info(data, URI, exchange_token="t")


def test_key_not_matching_the_certificate(data: dict[str, Any]) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    data["privateKey"] = other.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    with pytest.raises(ConfigError, match=f"static connection info for {URI.short}"):
        static_dial_info(data, URI, exchange_token="t")


def test_garbage_private_key(data: dict[str, Any]) -> None:
    data["privateKey"] = "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"
    with pytest.raises(ConfigError, match=f"static connection info for {URI.short}"):
        static_dial_info(data, URI, exchange_token="t")


# --- StaticSource ---------------------------------------------------------------------------------


def test_static_source(data: dict[str, Any]) -> None:
    info = static_dial_info(data, URI, exchange_token="t")
    src = StaticSource(info)
    assert src.name == URI.short
    assert src.current() is info and src.error() is None
    called: list[int] = []
    src.when_ready(lambda: called.append(1))
    assert called == [1]
    src.dial_failed("connect")  # nothing to refresh; must not raise
    assert src.current() is info


def test_static_source_with_an_expired_certificate_says_so(data: dict[str, Any]) -> None:
    info = static_dial_info(data, URI, exchange_token="t")
    src = StaticSource(info, wall=lambda: info.expires_at + 1)
    assert src.current() is None
    err = src.error()
    assert isinstance(err, ConfigError)
    assert "expired" in str(err) and "never refreshed" in str(err)
