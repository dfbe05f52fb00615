"""Logging set-up: the Auth Proxy's streams and shapes on stdlib logging.

Info and debug go to stdout, warnings and errors to stderr (so a supervisor that only keeps stderr
still sees every failure). ``--structured-logs`` writes one JSON object per line with the keys
Cloud Logging reads (``severity``, ``message``, ``timestamp``); otherwise lines look like the Go
proxy's (``2006/01/02 15:04:05 message``). Nothing here formats tokens or keys: callers never pass
them (tests scan a debug-level run for them).
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import TextIO

_SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


class StructuredFormatter(logging.Formatter):
    """One JSON object per record: ``{"severity", "timestamp", "message"}`` (+ ``worker``)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        entry: dict[str, object] = {
            "severity": _SEVERITY.get(record.levelno, record.levelname),
            "timestamp": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "message": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        if record.exc_info:
            entry["message"] = f"{entry['message']}\n{self.formatException(record.exc_info)}"
        return json.dumps(entry, ensure_ascii=False)


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def setup_logging(
    *,
    structured: bool = False,
    debug: bool = False,
    quiet: bool = False,
    worker: int | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> None:
    """Configure the root logger (replacing earlier handlers: safe to call again after a fork).

    ``quiet`` keeps warnings and errors only (the proxy's warnings are failures of a connection
    or a refresh: what the Auth Proxy logs as errors); ``debug`` adds refresh and dial detail.
    With both, ``quiet`` wins, as in the Auth Proxy (whose --quiet discards stdout entirely).
    """
    level = logging.WARNING if quiet else logging.DEBUG if debug else logging.INFO
    if structured:
        formatter: logging.Formatter = StructuredFormatter(worker)
    else:
        prefix = f"[worker {worker}] " if worker is not None else ""
        formatter = logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%Y/%m/%d %H:%M:%S")
    out = logging.StreamHandler(stdout or sys.stdout)
    out.addFilter(_Below(logging.WARNING))
    err = logging.StreamHandler(stderr or sys.stderr)
    err.setLevel(logging.WARNING)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in (out, err):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)
