"""fastproxy.duration: Go's time.ParseDuration syntax, strictly."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastproxy.duration import parse_duration
from fastproxy.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("1m30s", 90.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("1h2m3s4ms", 3723.004),
        ("2h45m", 9900.0),
        ("300us", 300e-6),
        ("300µs", 300e-6),
        ("300μs", 300e-6),
        ("10ns", 10e-9),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("1s1s", 2.0),  # Go adds repeated units too
        (" 30s ", 30.0),
    ],
)
def test_valid(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "30",  # a bare number other than 0 has no unit
        "1.5",
        "00",
        "-1s",
        "s",
        "1x",
        "1 s",
        "1S",
        "1sec",
        "1m 30s",
        "abc",
        ".s",
        "1..5s",
        "\u0663s",  # ARABIC-INDIC DIGIT THREE: Go accepts ASCII digits only
        "1" * 400 + "h",  # overflows a float
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)


def test_error_names_the_text() -> None:
    with pytest.raises(ConfigError, match="'7 days'"):
        parse_duration("7 days")


@given(st.text())
def test_fuzz_only_config_error(text: str) -> None:
    try:
        value = parse_duration(text)
    except ConfigError:
        return
    assert math.isfinite(value) and value >= 0.0


_UNIT_S = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(sorted(_UNIT_S))), min_size=1))
def test_fuzz_sums_of_parts(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{unit}" for n, unit in parts)
    expected = sum(n * _UNIT_S[unit] for n, unit in parts)
    assert parse_duration(text) == pytest.approx(expected, rel=1e-9, abs=1e-12)
