"""fastproxy.logs: info on stdout, warnings and errors on stderr, and the structured JSON shape."""

from __future__ import annotations

import datetime
import io
import json
import logging
import re
from collections.abc import Callable, Iterator

import pytest

from fastproxy.logs import StructuredFormatter, setup_logging

log = logging.getLogger("fastproxy")
PLAIN = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (?P<rest>.*)$")

Streams = tuple[io.StringIO, io.StringIO]


@pytest.fixture
def configure() -> Iterator[Callable[..., Streams]]:
    """setup_logging onto StringIO streams; the root logger is restored afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)

    def run(**kw: object) -> Streams:
        out, err = io.StringIO(), io.StringIO()
        setup_logging(stdout=out, stderr=err, **kw)  # type: ignore[arg-type]
        return out, err

    yield run
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def emit_all() -> None:
    log.debug("a debug line")
    log.info("an info line")
    log.warning("a warning line")
    log.error("an error line")


def messages(stream: io.StringIO) -> list[str]:
    out = []
    for line in stream.getvalue().splitlines():
        m = PLAIN.match(line)
        assert m, line
        out.append(m["rest"])
    return out


def records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_info_on_stdout_warnings_and_errors_on_stderr(configure: Callable[..., Streams]) -> None:
    out, err = configure()
    emit_all()
    assert messages(out) == ["an info line"]
    assert messages(err) == ["a warning line", "an error line"]


def test_debug_adds_debug_lines_on_stdout(configure: Callable[..., Streams]) -> None:
    out, err = configure(debug=True)
    emit_all()
    assert messages(out) == ["a debug line", "an info line"]
    assert messages(err) == ["a warning line", "an error line"]


def test_quiet_drops_info(configure: Callable[..., Streams]) -> None:
    out, err = configure(quiet=True)
    emit_all()
    assert out.getvalue() == ""
    assert messages(err) == ["a warning line", "an error line"]


def test_quiet_wins_over_debug(configure: Callable[..., Streams]) -> None:
    """As the Auth Proxy: --quiet discards everything but errors, whatever --debug-logs says."""
    out, err = configure(quiet=True, debug=True)
    emit_all()
    assert out.getvalue() == ""
    assert messages(err) == ["a warning line", "an error line"]


def test_critical_goes_to_stderr(configure: Callable[..., Streams]) -> None:
    out, err = configure()
    log.critical("the end")
    assert (out.getvalue(), messages(err)) == ("", ["the end"])


def test_worker_prefix(configure: Callable[..., Streams]) -> None:
    out, err = configure(worker=3)
    emit_all()
    assert messages(out) == ["[worker 3] an info line"]
    assert messages(err) == ["[worker 3] a warning line", "[worker 3] an error line"]


def test_structured_lines(configure: Callable[..., Streams]) -> None:
    out, err = configure(structured=True, debug=True)
    before = datetime.datetime.now(datetime.UTC)
    emit_all()
    after = datetime.datetime.now(datetime.UTC)
    got_out, got_err = records(out), records(err)
    assert [(r["severity"], r["message"]) for r in got_out] == [
        ("DEBUG", "a debug line"),
        ("INFO", "an info line"),
    ]
    assert [(r["severity"], r["message"]) for r in got_err] == [
        ("WARNING", "a warning line"),
        ("ERROR", "an error line"),
    ]
    for r in got_out + got_err:
        assert set(r) == {"severity", "message", "timestamp"}
        stamp = str(r["timestamp"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
        when = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.UTC
        )
        assert before - datetime.timedelta(seconds=1) <= when <= after


def test_structured_worker_and_quiet(configure: Callable[..., Streams]) -> None:
    out, err = configure(structured=True, quiet=True, worker=0)
    emit_all()
    assert out.getvalue() == ""
    assert [(r["severity"], r["worker"]) for r in records(err)] == [("WARNING", 0), ("ERROR", 0)]


def test_structured_message_is_one_json_line(configure: Callable[..., Streams]) -> None:
    out, err = configure(structured=True)
    log.info('quotes " and\nnewlines and ünïcode %s', "args")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    [info] = records(out)
    assert info["message"] == 'quotes " and\nnewlines and ünïcode args'
    assert len(out.getvalue().splitlines()) == 1
    [failure] = records(err)
    assert failure["severity"] == "ERROR"
    message = str(failure["message"])
    assert message.startswith("it failed\nTraceback") and "ValueError: boom" in message


def test_setup_again_replaces_handlers(configure: Callable[..., Streams]) -> None:
    first_out, _ = configure()
    second_out, _ = configure(worker=1)
    log.info("once")
    assert first_out.getvalue() == ""
    assert messages(second_out) == ["[worker 1] once"]
    assert len(logging.getLogger().handlers) == 2


def test_formatter_severity_for_custom_level() -> None:
    record = logging.LogRecord("x", 25, __file__, 1, "custom", None, None)
    record.levelname = "NOTICE"
    assert json.loads(StructuredFormatter().format(record))["severity"] == "NOTICE"
