# google-auth is unannotated; calling it is allowed here (see fastproxy/credentials.py).
# mypy: disallow-untyped-calls=False
"""Credential sources and flag rules (fastproxy.credentials).

Key-file, JSON, ADC and impersonation paths are checked for credential type and scopes only:
refreshing them would call Google's token endpoints, which do not exist here. The static-token
path is exercised for real against the emulator; gcloud is a fake script on PATH.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from pathlib import Path
from typing import Any

import google.auth.compute_engine._metadata
import google.auth.impersonated_credentials
import google.oauth2.credentials
import google.oauth2.service_account
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fastproxy.admin import AdminClient
from fastproxy.credentials import (
    CLOUD_PLATFORM_SCOPE,
    LOGIN_SCOPE,
    CredentialOptions,
    GcloudCredentials,
    TokenError,
    build_credentials,
    notices,
    parse_impersonation_chain,
    token_for,
    validate,
)
from fastproxy.errors import ConfigError
from fastproxy.instance_uri import InstanceURI
from fastproxy.keys import generate_key, public_key_pem
from tests.conftest import EmulatorProcess

SA_EMAIL = "fake-sa@fake-project.iam.gserviceaccount.com"


@pytest.fixture(scope="module")
def sa_info() -> dict[str, Any]:
    """A service-account key file's contents with a real (throwaway) RSA key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return {
        "type": "service_account",
        "project_id": "fake-project",
        "private_key_id": "0123456789abcdef",
        "private_key": pem,
        "client_email": SA_EMAIL,
        "client_id": "1234567890",
        "token_uri": "https://oauth2.googleapis.com/token",
    }


@pytest.fixture
def sa_file(tmp_path: Path, sa_info: dict[str, Any]) -> Path:
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(sa_info))
    return path


# --- validate: the Auth Proxy's mutual-exclusion rules ---------------------------------------
@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (
            CredentialOptions(token="t", credentials_file="f"),
            "cannot specify --token and --credentials-file flags at the same time",
        ),
        (
            CredentialOptions(token="t", gcloud_auth=True),
            "cannot specify --token and --gcloud-auth flags at the same time",
        ),
        (
            CredentialOptions(credentials_file="f", gcloud_auth=True),
            "cannot specify --credentials-file and --gcloud-auth flags at the same time",
        ),
        (
            CredentialOptions(json_credentials="{}", token="t"),
            "cannot specify --json-credentials and --token flags at the same time",
        ),
        (
            CredentialOptions(json_credentials="{}", credentials_file="f"),
            "cannot specify --json-credentials and --credentials-file flags at the same time",
        ),
        (
            CredentialOptions(json_credentials="{}", gcloud_auth=True),
            "cannot specify --json-credentials and --gcloud-auth flags at the same time",
        ),
    ],
)
def test_conflicting_sources_are_rejected(opts: CredentialOptions, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(opts)
    assert str(info.value) == message
    with pytest.raises(ConfigError):
        build_credentials(opts)


@pytest.mark.parametrize(
    "opts",
    [
        CredentialOptions(),
        CredentialOptions(token="t"),
        CredentialOptions(token="t", login_token="l", auto_iam_authn=True),
        # the Auth Proxy ignores (logs) a login token without auto IAM authn; it is no error
        CredentialOptions(token="t", login_token="l"),
        CredentialOptions(login_token="l", auto_iam_authn=True),
        CredentialOptions(token="t", impersonate_service_account="a@x"),
        CredentialOptions(credentials_file="f", impersonate_service_account="a@x,b@x"),
        CredentialOptions(gcloud_auth=True, impersonate_service_account="a@x"),
        CredentialOptions(json_credentials="{}", quota_project="q"),
        CredentialOptions(token="", credentials_file="f"),  # empty means not given
    ],
)
def test_allowed_combinations(opts: CredentialOptions) -> None:
    validate(opts)


def test_notices_for_an_unused_login_token() -> None:
    assert notices(CredentialOptions(token="t", login_token="l")) == [
        "Ignoring --login-token because --auto-iam-authn is not enabled "
        "(globally or per-instance)"
    ]
    assert notices(CredentialOptions(token="t", login_token="l", auto_iam_authn=True)) == []


def test_impersonation_chain_order() -> None:
    assert parse_impersonation_chain("target@x") == ("target@x", [])
    # sa1,sa2,sa3: the caller impersonates sa3, which impersonates sa2, which impersonates sa1
    assert parse_impersonation_chain("sa1,sa2,sa3") == ("sa1", ["sa3", "sa2"])
    assert parse_impersonation_chain(" sa1 , sa2 ") == ("sa1", ["sa2"])
    for bad in ("", "a,,b", "a,", ",a"):
        with pytest.raises(ConfigError, match="impersonate-service-account"):
            parse_impersonation_chain(bad)


def test_options_repr_hides_secrets(sa_info: dict[str, Any]) -> None:
    opts = CredentialOptions(
        token="secret-token", login_token="secret-login", json_credentials=json.dumps(sa_info)
    )
    text = repr(opts)
    assert "secret-token" not in text and "secret-login" not in text
    assert "PRIVATE KEY" not in text


# --- static tokens --------------------------------------------------------------------------
def test_static_token_is_used_for_api_and_login() -> None:
    creds = build_credentials(CredentialOptions(token="tok"))
    assert isinstance(creds.api, google.oauth2.credentials.Credentials)
    assert creds.login is creds.api
    assert token_for(creds.api) == "tok"
    assert token_for(creds.login) == "tok"


def test_login_token_only_with_auto_iam_authn() -> None:
    creds = build_credentials(
        CredentialOptions(token="tok", login_token="login", auto_iam_authn=True)
    )
    assert token_for(creds.api) == "tok"
    assert token_for(creds.login) == "login"
    ignored = build_credentials(CredentialOptions(token="tok", login_token="login"))
    assert token_for(ignored.login) == "tok"


def test_static_token_quota_project() -> None:
    creds = build_credentials(CredentialOptions(token="tok", quota_project="qp"))
    assert creds.api.quota_project_id == "qp"


def test_static_token_against_the_emulator(emulator_echo: EmulatorProcess) -> None:
    creds = build_credentials(CredentialOptions(token=emulator_echo.token))
    uri = InstanceURI.parse(emulator_echo.instance(0)["uri"])
    with AdminClient(creds.api, endpoint=emulator_echo.admin_endpoint) as client:
        material = client.fetch(uri, public_key_pem(generate_key()))
    assert material.ip_addresses
    assert token_for(creds.login) == emulator_echo.token


def test_token_for_wraps_refresh_failures() -> None:
    # no token and nothing to refresh with
    creds = google.oauth2.credentials.Credentials(None)
    with pytest.raises(TokenError, match="could not obtain an access token"):
        token_for(creds)


# --- key files, JSON, ADC, impersonation: types and scopes, no refresh ----------------------
def _assert_sa(creds: Any, scope: str) -> None:
    assert isinstance(creds, google.oauth2.service_account.Credentials)
    assert creds.service_account_email == SA_EMAIL
    assert list(creds.scopes) == [scope]
    assert not creds.valid  # nothing was fetched


def test_credentials_file(sa_file: Path) -> None:
    creds = build_credentials(CredentialOptions(credentials_file=str(sa_file)))
    _assert_sa(creds.api, CLOUD_PLATFORM_SCOPE)
    _assert_sa(creds.login, LOGIN_SCOPE)


def test_credentials_file_with_quota_project(sa_file: Path) -> None:
    creds = build_credentials(
        CredentialOptions(credentials_file=str(sa_file), quota_project="qp")
    )
    assert creds.api.quota_project_id == "qp"


def test_missing_or_bad_credentials_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--credentials-file"):
        build_credentials(CredentialOptions(credentials_file=str(tmp_path / "nope.json")))
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "nonsense"}')
    with pytest.raises(ConfigError, match="--credentials-file"):
        build_credentials(CredentialOptions(credentials_file=str(bad)))


def test_json_credentials(sa_info: dict[str, Any]) -> None:
    creds = build_credentials(CredentialOptions(json_credentials=json.dumps(sa_info)))
    _assert_sa(creds.api, CLOUD_PLATFORM_SCOPE)
    _assert_sa(creds.login, LOGIN_SCOPE)


def test_bad_json_credentials_are_not_echoed(sa_info: dict[str, Any]) -> None:
    broken = json.dumps(sa_info)[:-1]
    with pytest.raises(ConfigError) as info:
        build_credentials(CredentialOptions(json_credentials=broken))
    assert "not valid JSON" in str(info.value)
    assert "PRIVATE KEY" not in str(info.value)
    with pytest.raises(ConfigError, match="JSON object"):
        build_credentials(CredentialOptions(json_credentials="[1]"))
    incomplete = {k: v for k, v in sa_info.items() if k != "client_email"}
    with pytest.raises(ConfigError) as info:
        build_credentials(CredentialOptions(json_credentials=json.dumps(incomplete)))
    assert "PRIVATE KEY" not in str(info.value)


def test_adc_from_google_application_credentials(
    sa_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(sa_file))
    creds = build_credentials(CredentialOptions())
    _assert_sa(creds.api, CLOUD_PLATFORM_SCOPE)
    _assert_sa(creds.login, LOGIN_SCOPE)


def test_no_adc_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    empty = tmp_path / "gcloud-config"
    empty.mkdir()
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(empty))  # no gcloud ADC file there
    monkeypatch.setenv("HOME", str(tmp_path))
    # not on GCE: never probe the metadata server (there is no network)
    monkeypatch.setattr(
        google.auth.compute_engine._metadata, "is_on_gce", lambda *a, **k: False
    )
    with pytest.raises(ConfigError) as info:
        build_credentials(CredentialOptions())
    assert str(info.value).startswith("no credentials found")
    assert "\n" not in str(info.value)


def test_impersonation_wraps_the_source(sa_file: Path) -> None:
    creds = build_credentials(
        CredentialOptions(
            credentials_file=str(sa_file),
            impersonate_service_account="target@p.iam.gserviceaccount.com,d1@p,d2@p",
            quota_project="qp",
        )
    )
    for c, scope in ((creds.api, CLOUD_PLATFORM_SCOPE), (creds.login, LOGIN_SCOPE)):
        assert isinstance(c, google.auth.impersonated_credentials.Credentials)
        assert c.service_account_email == "target@p.iam.gserviceaccount.com"
        assert c._target_scopes == [scope]
        assert c._delegates == ["d2@p", "d1@p"]
        # google-auth re-scopes the source itself for the IAM Credentials API
        source = c._source_credentials
        assert isinstance(source, google.oauth2.service_account.Credentials)
        assert source.service_account_email == SA_EMAIL
    assert creds.api.quota_project_id == "qp"


def test_impersonation_with_a_static_token() -> None:
    creds = build_credentials(
        CredentialOptions(token="tok", impersonate_service_account="target@p")
    )
    assert isinstance(creds.api, google.auth.impersonated_credentials.Credentials)
    source = creds.api._source_credentials
    assert isinstance(source, google.oauth2.credentials.Credentials)
    assert source.token == "tok"


# --- gcloud -----------------------------------------------------------------------------------
def _fake_gcloud(bin_dir: Path, body: str) -> Path:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "gcloud"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


def test_gcloud_auth_reads_config_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    args_file = tmp_path / "args"
    counter = tmp_path / "n"
    counter.write_text("0")
    # Each run prints token-N; the first one expired a minute ago, so using it forces a rerun.
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    _fake_gcloud(
        bin_dir,
        f'echo "$@" > "{args_file}"\n'
        f'n=$(( $(cat "{counter}") + 1 )); echo $n > "{counter}"\n'
        f'if [ $n -eq 1 ]; then exp={past}; else exp={future}; fi\n'
        'printf \'{"configuration": {}, "credential": {"access_token": "token-%s", '
        '"token_expiry": "%s"}}\' "$n" "$exp"\n',
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    creds = build_credentials(CredentialOptions(gcloud_auth=True))
    assert isinstance(creds.api, GcloudCredentials)
    assert creds.login is creds.api
    assert creds.api.token == "token-1"
    assert not creds.api.valid  # expired
    assert args_file.read_text().split() == [
        "config", "config-helper", "--format=json", "--min-expiry=1h"
    ]
    assert token_for(creds.api) == "token-2"
    assert creds.api.valid
    assert creds.api.expiry is not None and creds.api.expiry.tzinfo is None
    assert token_for(creds.api) == "token-2"  # still valid: no third run
    assert counter.read_text().strip() == "2"


def test_gcloud_auth_failure_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    _fake_gcloud(bin_dir, 'echo "noise" >&2\necho "ERROR: not logged in" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ConfigError) as info:
        build_credentials(CredentialOptions(gcloud_auth=True))
    assert "exit status 1" in str(info.value)
    assert "ERROR: not logged in" in str(info.value)


def test_gcloud_auth_bad_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    _fake_gcloud(bin_dir, 'echo "{\\"credential\\": {}}"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ConfigError, match="no access token"):
        build_credentials(CredentialOptions(gcloud_auth=True))


def test_gcloud_missing_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(ConfigError, match="gcloud was not found on PATH"):
        build_credentials(CredentialOptions(gcloud_auth=True))
