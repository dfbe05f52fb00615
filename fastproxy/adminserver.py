"""The localhost-only admin server: ``/quitquitquit`` and Python counterparts of Go's pprof.

As in the Auth Proxy it is off by default, is enabled by ``--quitquitquit`` and/or ``--debug``,
listens on ``--admin-port`` (default 9091) and binds the loopback address only (127.0.0.1 here). It
runs on its own daemon thread (stdlib ``ThreadingHTTPServer``, one thread per request) and never
touches the event loop's state: it reads ``sys._current_frames()``, the ``gc`` module and
``tracemalloc``, and, for ``/debug/vars``, the ``stats()`` snapshot of the attached status object.

Endpoints
=========
* ``/quitquitquit`` (``--quitquitquit``): ``GET`` or ``POST`` calls ``on_quit`` (the first time
  only) and answers 200 with an empty body; any other method answers 400 (the Auth Proxy's
  handler does the same).
* ``/debug/`` (``--debug``): an index of the following.
* ``/debug/threads``: the current stack of every thread (text), like Go's goroutine dump.
* ``/debug/profile?seconds=N``: a sampling profile of the event loop thread. Every
  :data:`SAMPLE_INTERVAL` seconds for N seconds (default 30, 0 < N <= 60) the loop thread's stack
  is sampled; the answer is "collapsed stacks", one ``root;caller;callee COUNT`` line per distinct
  stack, most frequent first (feed it to ``flamegraph.pl`` or speedscope). ``&thread=all``
  samples every thread, each stack prefixed with the thread's name.
* ``/debug/gc``: garbage collector counts, thresholds and per-generation statistics, and the 30
  most numerous object types among the objects the collector tracks.
* ``/debug/tracemalloc``: the top allocation sites if ``tracemalloc`` is tracing (start the
  process with ``PYTHONTRACEMALLOC=25``), else how to turn it on.
* ``/debug/vars``: the proxy's counters as JSON (when a status object with ``stats()`` is
  attached).

Anything else answers 404. Nothing here shows a token, a key or a frame's local variables: stacks
are function names, files and line numbers; gc shows type names and counts; vars are ints.

The ``/debug`` endpoints cost CPU while they run (``/debug/gc`` walks every tracked object while
holding the GIL, which pauses the loop for as long): they are for diagnosing, not for scraping.
"""

from __future__ import annotations

import collections
import gc
import json
import logging
import os
import sys
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastproxy.errors import ConfigError

__all__ = ["DEFAULT_ADMIN_PORT", "MAX_PROFILE_SECONDS", "SAMPLE_INTERVAL", "AdminServer"]

log = logging.getLogger("fastproxy.adminserver")

DEFAULT_ADMIN_PORT = 9091
ADMIN_HOST = "127.0.0.1"
#: Sampling period of ``/debug/profile`` (seconds).
SAMPLE_INTERVAL = 0.005
MAX_PROFILE_SECONDS = 60.0
DEFAULT_PROFILE_SECONDS = 30.0
#: Threads named so are the event loop (``Proxy.start``); used when no status object says which.
LOOP_THREAD_NAME = "fastproxy-loop"
TOP_TYPES = 30
TOP_ALLOCATIONS = 30
#: Request bodies are ignored; up to this many bytes are read and dropped.
MAX_BODY = 64 * 1024

_TEXT = "text/plain; charset=utf-8"

_INDEX = """\
fastproxy debug endpoints (localhost only)

/debug/threads                 current stack of every thread
/debug/profile?seconds=N       sampling profile of the event loop thread, N <= 60 (default 30);
                               collapsed stacks "frame;frame;frame count", most frequent first;
                               &thread=all samples every thread
/debug/gc                      garbage collector counts and the most numerous object types
/debug/tracemalloc             top allocation sites (needs PYTHONTRACEMALLOC=25 or -X tracemalloc)
/debug/vars                    the proxy's counters (JSON)
"""

Response = tuple[int, str, bytes]


class _BadRequest(Exception):
    """A query the endpoint cannot serve: answered 400 with the message."""


def _frame_label(frame: FrameType) -> str:
    code = frame.f_code
    return f"{code.co_qualname} ({_short_path(code.co_filename)})"


def _short_path(path: str) -> str:
    """A file name relative to the package or stdlib root it lives in (stable across hosts)."""
    parts = path.replace("\\", "/").split("/")
    for anchor in ("site-packages", "fastproxy", "tests", "perf"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            start = i + 1 if anchor == "site-packages" else i
            return "/".join(parts[start:])
    return os.path.basename(path)


def _collapsed(frame: FrameType | None) -> str:
    labels: list[str] = []
    while frame is not None:
        labels.append(_frame_label(frame))
        frame = frame.f_back
    labels.reverse()
    return ";".join(labels)


class AdminServer:
    """The admin HTTP server on 127.0.0.1; the constructor binds (ConfigError if it cannot).

    ``on_quit`` is called (once, on a request thread) by ``/quitquitquit``. ``status`` is the proxy
    (or anything with ``stats()`` and optionally ``loop_thread_ident``); it may also be given later
    with :meth:`attach`, since the admin server starts before the proxy exists.
    """

    def __init__(
        self,
        port: int = DEFAULT_ADMIN_PORT,
        *,
        quitquitquit: bool,
        debug: bool,
        on_quit: Callable[[], None],
        status: object | None = None,
    ) -> None:
        self.quitquitquit = quitquitquit
        self.debug = debug
        self._on_quit = on_quit
        self._status = status
        self._quit_lock = threading.Lock()
        self._quit_called = False
        self._thread: threading.Thread | None = None

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        try:
            self._server = Server((ADMIN_HOST, port), _make_handler(self))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {ADMIN_HOST}:{port} for the admin server (--admin-port): "
                f"{exc.strerror or exc}"
            ) from exc

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def server_address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def attach(self, status: object) -> None:
        """The object ``/debug/vars`` and ``/debug/profile`` read (the ``Proxy``)."""
        self._status = status

    def start(self) -> None:
        serve: Callable[[], None] = self._server.serve_forever
        self._thread = threading.Thread(target=serve, name="fastproxy-admin-http", daemon=True)
        self._thread.start()
        log.debug("admin server listening on %s:%d", ADMIN_HOST, self.port)

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    # -- dispatch --------------------------------------------------------------------------------
    def respond(self, method: str, target: str) -> Response:
        """(status, content type, body) for one request."""
        parts = urlsplit(target)
        path = parts.path
        if self.quitquitquit and path == "/quitquitquit":
            if method not in ("GET", "POST"):
                return 400, _TEXT, b""
            self._quit()
            return 200, _TEXT, b""
        if self.debug and path.startswith("/debug") and method in ("GET", "HEAD"):
            query = parse_qs(parts.query)
            try:
                return self._debug(path, query)
            except _BadRequest as exc:
                return 400, _TEXT, f"{exc}\n".encode()
        return 404, _TEXT, b"not found\n"

    def _quit(self) -> None:
        with self._quit_lock:
            if self._quit_called:
                return
            self._quit_called = True
        log.debug("/quitquitquit received request")
        try:
            self._on_quit()
        except Exception:
            log.exception("the /quitquitquit callback failed")

    def _debug(self, path: str, query: dict[str, list[str]]) -> Response:
        if path in ("/debug", "/debug/"):
            return 200, _TEXT, _INDEX.encode()
        if path == "/debug/threads":
            return 200, _TEXT, self.thread_dump().encode()
        if path == "/debug/profile":
            seconds = _seconds(query)
            every = query.get("thread", ["loop"])[-1] == "all"
            return 200, _TEXT, self.profile(seconds, all_threads=every).encode()
        if path == "/debug/gc":
            return 200, _TEXT, gc_report().encode()
        if path == "/debug/tracemalloc":
            return 200, _TEXT, tracemalloc_report().encode()
        if path == "/debug/vars":
            stats = getattr(self._status, "stats", None)
            if not callable(stats):
                return 404, _TEXT, b"no proxy attached\n"
            body = json.dumps(stats(), indent=2, sort_keys=True, default=str) + "\n"
            return 200, "application/json", body.encode()
        return 404, _TEXT, b"not found\n"

    # -- the reports -----------------------------------------------------------------------------
    def loop_thread_ident(self) -> int | None:
        """The event loop's thread: the status object's ``loop_thread_ident``, else a thread named
        ``fastproxy-loop``, else None."""
        ident = getattr(self._status, "loop_thread_ident", None)
        if isinstance(ident, int):
            return ident
        for thread in threading.enumerate():
            if thread.name == LOOP_THREAD_NAME and thread.ident is not None:
                return thread.ident
        return None

    def thread_dump(self) -> str:
        threads = {t.ident: t for t in threading.enumerate()}
        loop = self.loop_thread_ident()
        out: list[str] = []
        for ident, frame in sorted(sys._current_frames().items()):
            t = threads.get(ident)
            name = t.name if t is not None else "?"
            flags = []
            if t is not None and t.daemon:
                flags.append("daemon")
            if ident == loop:
                flags.append("event loop")
            if ident == threading.get_ident():
                flags.append("this request")
            extra = f" [{', '.join(flags)}]" if flags else ""
            out.append(f'Thread "{name}" (ident {ident}){extra}:')
            out.extend(line.rstrip("\n") for line in traceback.format_stack(frame))
            out.append("")
        return "\n".join(out) + "\n"

    def profile(self, seconds: float, *, all_threads: bool = False) -> str:
        """Collapsed stacks of the loop thread (or every thread but this one) over ``seconds``."""
        me = threading.get_ident()
        target = None if all_threads else self.loop_thread_ident()
        if not all_threads and target is None:
            all_threads = True  # no loop known (not attached yet): profile everything
        names: dict[int, str] = {}
        counts: collections.Counter[str] = collections.Counter()
        deadline = time.monotonic() + seconds
        next_at = time.monotonic()
        while True:
            frames = sys._current_frames()
            if all_threads:
                if len(names) != len(frames):
                    names = {t.ident: t.name for t in threading.enumerate() if t.ident is not None}
                for ident, frame in frames.items():
                    if ident != me:
                        counts[f"{names.get(ident, ident)};{_collapsed(frame)}"] += 1
            else:
                sampled = frames.get(target) if target is not None else None
                if sampled is not None:
                    counts[_collapsed(sampled)] += 1
            del frames
            next_at += SAMPLE_INTERVAL
            now = time.monotonic()
            if now >= deadline:
                break
            if next_at > now:
                time.sleep(min(next_at, deadline) - now)
            else:
                next_at = now  # fell behind: do not burst to catch up
        lines = [
            f"{stack} {n}" for stack, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        if not lines:
            return ""
        return "\n".join(lines) + "\n"


def _seconds(query: dict[str, list[str]]) -> float:
    raw = query.get("seconds", [str(DEFAULT_PROFILE_SECONDS)])[-1]
    try:
        seconds = float(raw)
    except ValueError:
        raise _BadRequest(f"seconds must be a number, not {raw!r}") from None
    if not 0 < seconds <= MAX_PROFILE_SECONDS:
        raise _BadRequest(f"seconds must be > 0 and <= {MAX_PROFILE_SECONDS:g}")
    return seconds


def gc_report() -> str:
    out = [
        f"enabled: {gc.isenabled()}",
        f"counts (allocations since last collection, per generation): {gc.get_count()}",
        f"thresholds: {gc.get_threshold()}",
        f"frozen objects: {gc.get_freeze_count()}",
    ]
    for generation, stats in enumerate(gc.get_stats()):
        pairs = ", ".join(f"{key}={value}" for key, value in sorted(stats.items()))
        out.append(f"generation {generation}: {pairs}")
    objects = gc.get_objects()
    by_type: collections.Counter[str] = collections.Counter(
        f"{type(o).__module__}.{type(o).__qualname__}" for o in objects
    )
    out.append(f"tracked objects: {len(objects)}")
    del objects
    out.append(f"top {TOP_TYPES} types by count:")
    for name, count in by_type.most_common(TOP_TYPES):
        out.append(f"{count:>10}  {name}")
    return "\n".join(out) + "\n"


def tracemalloc_report() -> str:
    if not tracemalloc.is_tracing():
        return (
            "tracemalloc is not tracing. Start the proxy with PYTHONTRACEMALLOC=25 in its\n"
            "environment (or python -X tracemalloc=25 -m fastproxy ...) to see allocation sites.\n"
        )
    current, peak = tracemalloc.get_traced_memory()
    snapshot = tracemalloc.take_snapshot().filter_traces(
        (
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
        )
    )
    out = [
        f"traced memory: current {current} bytes, peak {peak} bytes",
        f"top {TOP_ALLOCATIONS} allocation sites by size:",
    ]
    for stat in snapshot.statistics("lineno")[:TOP_ALLOCATIONS]:
        frame = stat.traceback[0]
        where = f"{_short_path(frame.filename)}:{frame.lineno}"
        out.append(f"{stat.size:>12} B {stat.count:>8} blocks  {where}")
    return "\n".join(out) + "\n"


def _make_handler(admin: AdminServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fastproxy-admin"

        def _answer(self) -> None:
            method = self.command
            self._discard_body()
            try:
                status, ctype, data = admin.respond(method, self.path)
            except Exception:  # a bug must not kill the request thread silently
                log.exception("admin handler error for %s %s", method, self.path)
                status, ctype, data = 500, _TEXT, b"internal error\n"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)

        def _discard_body(self) -> None:
            # Read a (small) request body so that closing the connection does not reset it
            # before the client has read the answer.
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = 0
            if 0 < length <= MAX_BODY:
                self.rfile.read(length)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("admin: " + format, *args)

    return Handler
