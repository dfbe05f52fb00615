"""fastproxy.sdnotify: systemd's readiness datagram to ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastproxy.sdnotify import notify


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_ready_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert notify("READY=1", {"NOTIFY_SOCKET": path}) is True
    assert sock.recv(256) == b"READY=1"


def test_each_state_is_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    for state in ("READY=1", "STATUS=serving 2 instances", "STOPPING=1"):
        assert notify(state, {"NOTIFY_SOCKET": path})
    assert [sock.recv(256) for _ in range(3)] == [
        b"READY=1",
        b"STATUS=serving 2 instances",
        b"STOPPING=1",
    ]


def test_abstract_namespace() -> None:
    name = f"fastproxy-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(256) == b"READY=1"
    finally:
        sock.close()


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}], ids=["unset", "empty"])
def test_not_under_systemd(environ: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        assert notify("READY=1", environ) is False
    assert caplog.records == []


def test_defaults_to_process_environment(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify("READY=1") is True
    assert sock.recv(256) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify("READY=1") is False


@pytest.mark.parametrize("kind", ["missing", "not-a-socket", "abstract-unbound"])
def test_unreachable_socket_logs_an_error(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if kind == "missing":
        target = str(tmp_path / "nothing-here.sock")
    elif kind == "not-a-socket":
        target = str(tmp_path / "plain-file")
        Path(target).write_text("")
    else:
        target = f"@fastproxy-test-unbound-{uuid.uuid4().hex}"
    with caplog.at_level(logging.ERROR, logger="fastproxy"):
        assert notify("READY=1", {"NOTIFY_SOCKET": target}) is False
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    message = record.getMessage()
    assert message.startswith("Failed to notify systemd (READY=1): "), message
    assert "\n" not in message


def test_stream_socket_is_not_a_notify_socket(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "stream.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen()
        with caplog.at_level(logging.ERROR, logger="fastproxy"):
            assert notify("READY=1", {"NOTIFY_SOCKET": path}) is False
    finally:
        server.close()
        os.unlink(path)
    assert "Failed to notify systemd" in caplog.text
