"""fastproxy.adminserver: /quitquitquit, the /debug endpoints, localhost-only binding."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from fastproxy.adminserver import AdminServer
from fastproxy.errors import ConfigError
from fastproxy.proxy import Proxy
from tests.e2e_support import free_port

COLLAPSED_LINE = re.compile(r"^(\S.*) (\d+)$")
SECRETS: list[str] = []  # values only ever held in a parked thread's local variable


class Quits:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


@pytest.fixture
def admin() -> Iterator[Callable[..., tuple[AdminServer, str]]]:
    started: list[AdminServer] = []

    def start(**kw: Any) -> tuple[AdminServer, str]:
        kw.setdefault("quitquitquit", False)
        kw.setdefault("debug", False)
        kw.setdefault("on_quit", Quits())
        srv = AdminServer(0, **kw)
        srv.start()
        started.append(srv)
        return srv, f"http://127.0.0.1:{srv.port}"

    yield start
    for srv in started:
        srv.close()


def get(url: str, **kw: Any) -> requests.Response:
    return requests.get(url, timeout=kw.pop("timeout", 10), **kw)


# --- binding -------------------------------------------------------------------------------------


def test_binds_loopback_only_on_the_requested_port(
    admin: Callable[..., tuple[AdminServer, str]],
) -> None:
    srv, _ = admin(quitquitquit=True)
    assert srv.server_address == ("127.0.0.1", srv.port)
    assert srv.port > 0
    free = free_port()
    other = AdminServer(free, quitquitquit=True, debug=False, on_quit=Quits())
    try:
        assert other.port == free
    finally:
        other.close()


def test_port_in_use_is_one_line_config_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            AdminServer(port, quitquitquit=True, debug=False, on_quit=Quits())
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "admin server" in message
    assert "\n" not in message


# --- /quitquitquit -------------------------------------------------------------------------------


def test_quitquitquit_post_calls_on_quit_once(
    admin: Callable[..., tuple[AdminServer, str]],
) -> None:
    quits = Quits()
    _, base = admin(quitquitquit=True, on_quit=quits)
    r = requests.post(base + "/quitquitquit", timeout=10)
    assert (r.status_code, r.content) == (200, b"")
    assert quits.calls == 1
    r = requests.post(base + "/quitquitquit", data=b"ignored body", timeout=10)
    assert r.status_code == 200  # harmless
    assert get(base + "/quitquitquit").status_code == 200
    assert quits.calls == 1


def test_quitquitquit_accepts_get_and_refuses_other_methods(
    admin: Callable[..., tuple[AdminServer, str]],
) -> None:
    quits = Quits()
    _, base = admin(quitquitquit=True, on_quit=quits)
    assert requests.put(base + "/quitquitquit", timeout=10).status_code == 400
    assert requests.delete(base + "/quitquitquit", timeout=10).status_code == 400
    assert quits.calls == 0
    assert get(base + "/quitquitquit").status_code == 200
    assert quits.calls == 1


def test_quitquitquit_callback_failure_still_answers(
    admin: Callable[..., tuple[AdminServer, str]],
) -> None:
    def boom() -> None:
        raise RuntimeError("callback bug")

    _, base = admin(quitquitquit=True, on_quit=boom)
    assert requests.post(base + "/quitquitquit", timeout=10).status_code == 200


def test_endpoints_are_404_without_their_flag(
    admin: Callable[..., tuple[AdminServer, str]],
) -> None:
    quits = Quits()
    _, debug_only = admin(debug=True, on_quit=quits)
    assert requests.post(debug_only + "/quitquitquit", timeout=10).status_code == 404
    assert quits.calls == 0
    _, quit_only = admin(quitquitquit=True)
    for path in ("/debug/", "/debug/threads", "/debug/gc", "/debug/profile?seconds=1"):
        assert get(quit_only + path).status_code == 404, path
    assert get(quit_only + "/").status_code == 404
    assert get(debug_only + "/debug/nope").status_code == 404
    assert get(debug_only + "/metrics").status_code == 404


# --- /debug --------------------------------------------------------------------------------------


def test_debug_index_lists_the_endpoints(admin: Callable[..., tuple[AdminServer, str]]) -> None:
    _, base = admin(debug=True)
    for path in ("/debug/", "/debug"):
        r = get(base + path)
        assert r.status_code == 200
        for name in ("/debug/threads", "/debug/profile", "/debug/gc", "/debug/tracemalloc"):
            assert name in r.text


def _parked_thread(name: str, release: threading.Event) -> threading.Thread:
    def parked_in_a_recognisable_function() -> None:
        secret = os.urandom(16).hex()  # a local: stack dumps must never show locals
        SECRETS.append(secret)
        release.wait(30)

    t = threading.Thread(target=parked_in_a_recognisable_function, name=name, daemon=True)
    t.start()
    return t


def test_debug_threads_dumps_every_stack_without_locals(
    admin: Callable[..., tuple[AdminServer, str]],
) -> None:
    _, base = admin(debug=True)
    release = threading.Event()
    t = _parked_thread("parked-for-dump", release)
    try:
        time.sleep(0.05)
        r = get(base + "/debug/threads")
    finally:
        release.set()
        t.join()
    assert r.status_code == 200
    assert 'Thread "MainThread"' in r.text
    assert 'Thread "parked-for-dump"' in r.text
    assert "parked_in_a_recognisable_function" in r.text
    assert "[daemon" in r.text and "this request" in r.text
    assert SECRETS and not any(secret in r.text for secret in SECRETS)


def test_debug_profile_samples_the_loop_thread(
    admin: Callable[..., tuple[AdminServer, str]],
) -> None:
    proxy = Proxy([])
    srv, base = admin(debug=True, status=proxy)
    proxy.start()
    try:
        started = time.monotonic()
        r = get(base + "/debug/profile?seconds=1", timeout=30)
        assert time.monotonic() - started >= 1.0
    finally:
        proxy.stop()
        proxy.join(10)
    assert r.status_code == 200
    lines = r.text.splitlines()
    assert lines, "no samples"
    counts = []
    for line in lines:
        m = COLLAPSED_LINE.match(line)
        assert m, line
        counts.append(int(m.group(2)))
        assert "Loop.run" in m.group(1), line  # every sample is of the loop thread
    assert counts == sorted(counts, reverse=True)
    assert sum(counts) >= 50  # ~200 samples a second at 5 ms
    assert srv.loop_thread_ident() == proxy.loop_thread_ident


def test_debug_profile_without_a_loop_samples_every_thread(
    admin: Callable[..., tuple[AdminServer, str]],
) -> None:
    srv, base = admin(debug=True)
    assert srv.loop_thread_ident() is None
    release = threading.Event()
    t = _parked_thread("parked-for-profile", release)
    try:
        r = get(base + "/debug/profile?seconds=0.3")
    finally:
        release.set()
        t.join()
    assert r.status_code == 200
    lines = r.text.splitlines()
    assert any(
        line.startswith("parked-for-profile;") and "parked_in_a_recognisable_function" in line
        for line in lines
    ), r.text
    assert all(COLLAPSED_LINE.match(line) for line in lines)
    r = get(base + "/debug/profile?seconds=0.1&thread=all")
    assert r.status_code == 200 and r.text


@pytest.mark.parametrize("seconds", ["0", "-1", "61", "abc", "nan"])
def test_debug_profile_rejects_bad_durations(
    admin: Callable[..., tuple[AdminServer, str]], seconds: str
) -> None:
    _, base = admin(debug=True)
    r = get(base + f"/debug/profile?seconds={seconds}")
    assert r.status_code == 400
    assert "seconds" in r.text


def test_debug_gc(admin: Callable[..., tuple[AdminServer, str]]) -> None:
    _, base = admin(debug=True)
    r = get(base + "/debug/gc")
    assert r.status_code == 200
    assert "thresholds:" in r.text and "generation 0:" in r.text
    top = r.text.split("top 30 types by count:\n", 1)[1].splitlines()
    assert 1 <= len(top) <= 30
    assert any(line.split()[-1] == "builtins.dict" for line in top), top
    first = [int(line.split()[0]) for line in top]
    assert first == sorted(first, reverse=True)


def test_debug_tracemalloc(admin: Callable[..., tuple[AdminServer, str]]) -> None:
    _, base = admin(debug=True)
    was_tracing = tracemalloc.is_tracing()
    if was_tracing:  # e.g. run under PYTHONTRACEMALLOC
        tracemalloc.stop()
    try:
        r = get(base + "/debug/tracemalloc")
        assert r.status_code == 200
        assert "not tracing" in r.text and "PYTHONTRACEMALLOC" in r.text
        tracemalloc.start()
        keep = [bytearray(1000) for _ in range(100)]
        r = get(base + "/debug/tracemalloc")
        assert r.status_code == 200
        assert "traced memory" in r.text and "allocation sites" in r.text
        assert len(r.text.splitlines()) > 2
        del keep
    finally:
        tracemalloc.stop()
        if was_tracing:
            tracemalloc.start()


def test_debug_vars(admin: Callable[..., tuple[AdminServer, str]]) -> None:
    srv, base = admin(debug=True)
    assert get(base + "/debug/vars").status_code == 404  # nothing attached yet
    proxy = Proxy([])
    proxy.start()
    try:
        srv.attach(proxy)
        r = get(base + "/debug/vars")
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "application/json"
        data = json.loads(r.text)
        assert data["accepted"] == 0 and "pool_capacity" in data
    finally:
        proxy.stop()
        proxy.join(10)
