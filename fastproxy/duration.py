"""Go-style durations (``30s``, ``1m30s``, ``250ms``, ``1.5h``), as the Auth Proxy's flags take.

Pure and strict: a bare number without a unit is refused, except ``0``, as Go's
``time.ParseDuration`` does; so is a negative duration, which no flag of ours can use.
"""

from __future__ import annotations

import math
import re

from fastproxy.errors import ConfigError

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
# ASCII digits only: a bare ``\d`` also takes "٣s" (and float() reads it), which Go refuses.
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", re.ASCII)


def parse_duration(text: str) -> float:
    """Seconds in ``text``; ConfigError naming the text when it is not a duration."""
    s = text.strip()
    if s == "0":
        return 0.0
    if not s:
        raise ConfigError('invalid duration "": expected e.g. 30s, 1m30s or 250ms')
    pos, total = 0, 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise ConfigError(f"invalid duration {text!r}: expected e.g. 30s, 1m30s or 250ms")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not math.isfinite(total):  # float() reads a thousand digits as inf; Go reports overflow
        raise ConfigError(f"invalid duration {text!r}: too large")
    return total
