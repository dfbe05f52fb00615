"""Tokens and keys never reach a log line, at any level, in either log format.

A debug-level run with the Admin API path (token, certificate fetch, dials)
and one with static connection info (whose private key is in the file) are scanned for the
token and for every line of the private key's base64 body.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import EmulatorProcess, ProxyProcess
from tests.e2e_support import DEMO_URI, echo_once, static_args, write_static_info

SECRET = "tok-Zq8x3VbN1mW7pL0kR4sT9yU2"


def _traffic(port: int) -> None:
    for i in range(5):
        payload = f"payload {i}".encode()
        assert echo_once(port, payload) == payload


def _key_fragments(pem: str) -> list[str]:
    return [ln for ln in pem.splitlines() if ln and not ln.startswith("-----") and len(ln) > 16]


def _assert_clean(text: str, fragments: list[str], token: str = SECRET) -> None:
    assert token not in text
    assert "PRIVATE KEY" not in text
    for fragment in fragments:
        assert fragment not in text


@pytest.mark.e2e
@pytest.mark.parametrize("structured", [False, True], ids=["text", "structured"])
def test_admin_api_path_debug_logs_hold_no_token(
    emulator_factory: Callable[..., EmulatorProcess],
    proxy_factory: Callable[..., ProxyProcess],
    structured: bool,
) -> None:
    emu = emulator_factory("--backend", "echo", "--token", f"{SECRET}=u@example.com")
    extra = ["--structured-logs"] if structured else []
    proxy = proxy_factory(
        DEMO_URI,
        "--alloydbadmin-api-endpoint",
        emu.admin_endpoint,
        "--token",
        SECRET,
        "--port",
        "0",
        "--debug-logs",
        *extra,
    )
    _traffic(proxy.port)
    assert proxy.stop(signal.SIGTERM) == 143
    out = proxy.output()
    assert "dial" in out.lower() or "refresh" in out.lower()  # debug detail was on
    _assert_clean(out, [])
    if structured:
        for line in out.splitlines():
            entry = json.loads(line)
            assert {"severity", "message", "timestamp"} <= set(entry)


@pytest.mark.e2e
def test_static_info_debug_logs_hold_no_key(
    emulator_echo: EmulatorProcess,
    proxy_factory: Callable[..., ProxyProcess],
    tmp_path: Path,
) -> None:
    static = write_static_info(emulator_echo, "echo-token", tmp_path / "static.json")
    data = json.loads(static.read_text())
    fragments = _key_fragments(data["privateKey"])
    assert fragments
    proxy = proxy_factory(
        *static_args(static, "echo-token"),
        "--debug-logs",
    )
    _traffic(proxy.port)
    proxy.stop(signal.SIGTERM)
    _assert_clean(proxy.output(), fragments, token="echo-token")
