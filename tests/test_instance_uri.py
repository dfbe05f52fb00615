"""Instance URI parsing (protocol.md §1.2), derived names, and the ``?k=v`` option splitter."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastproxy.errors import ConfigError, FastproxyError
from fastproxy.instance_uri import InstanceURI, split_query

P = "projects/p/locations/r/clusters/c/instances/i"
EXPECTED = (
    "invalid instance URI, expected "
    "projects/<PROJECT>/locations/<REGION>/clusters/<CLUSTER>/instances/<INSTANCE> "
)


# --- the table of protocol.md §1.2, plus our stricter rejections ----------------------------------


@pytest.mark.parametrize(
    ("uri", "parts"),
    [
        (P, ("p", "r", "c", "i")),
        (
            "projects/google.com:p/locations/r/clusters/c/instances/i",
            ("google.com:p", "r", "c", "i"),
        ),
        (
            "projects/my-proj-123/locations/us-central1/clusters/my-cluster/instances/my-primary",
            ("my-proj-123", "us-central1", "my-cluster", "my-primary"),
        ),
        ("projects/P/locations/R/clusters/C/instances/I", ("P", "R", "C", "I")),
    ],
)
def test_accepts(uri: str, parts: tuple[str, str, str, str]) -> None:
    parsed = InstanceURI.parse(uri)
    assert (parsed.project, parsed.region, parsed.cluster, parsed.name) == parts
    assert parsed.uri == uri
    assert str(parsed) == uri


@pytest.mark.parametrize(
    "uri",
    [
        pytest.param("projects/a:b:c/locations/r/clusters/c/instances/i", id="two-colons"),
        pytest.param("projects/p/locations/r/clusters/c/instances/", id="empty-instance"),
        pytest.param("projects/p/locations/r:z/clusters/c/instances/i", id="colon-in-region"),
        pytest.param("projects/p/locations/r/clusters/c:x/instances/i", id="colon-in-cluster"),
        pytest.param("projects/p/locations/r/clusters/c/instances/i:x", id="colon-in-instance"),
        pytest.param(P + "/x", id="slash-in-instance"),
        pytest.param("projects/p/locations/r/x/clusters/c/instances/i", id="slash-in-region"),
        pytest.param("projects/p/locations/r/clusters/c/x/instances/i", id="slash-in-cluster"),
        pytest.param("projects/p/q/locations/r/clusters/c/instances/i", id="slash-in-project"),
        pytest.param("projects//locations/r/clusters/c/instances/i", id="empty-project"),
        pytest.param("projects/:p/locations/r/clusters/c/instances/i", id="empty-domain"),
        pytest.param("projects/d:/locations/r/clusters/c/instances/i", id="empty-project-id"),
        pytest.param("projects/p/locations//clusters/c/instances/i", id="empty-region"),
        pytest.param("projects/p/locations/r/clusters//instances/i", id="empty-cluster"),
        pytest.param("xx" + P, id="prefix"),  # Go's unanchored search would accept it
        pytest.param("/" + P, id="leading-slash"),
        pytest.param(P + "/", id="trailing-slash"),
        pytest.param(P + "\n", id="trailing-newline"),
        pytest.param(" " + P, id="leading-space"),
        pytest.param("projects/p/locations/r/clusters/c/instances/i j", id="space"),
        pytest.param("projects/p/locations/r/clusters/c/instances/i\x00", id="nul"),
        pytest.param(P + "?port=5000", id="query-not-split"),
        pytest.param("project/p/locations/r/clusters/c/instances/i", id="typo-keyword"),
        pytest.param("projects/p/locations/r/instances/i", id="no-cluster"),
        pytest.param("p.r.c.i", id="short-form"),
        pytest.param("", id="empty"),
    ],
)
def test_rejects(uri: str) -> None:
    with pytest.raises(ConfigError) as info:
        InstanceURI.parse(uri)
    message = str(info.value)
    assert message.startswith(EXPECTED)
    assert message.endswith(")")
    assert "\n" not in message and "\x00" not in message  # escaped, one clear line


def test_error_message_exact() -> None:
    with pytest.raises(ConfigError) as info:
        InstanceURI.parse("projects/a:b:c/locations/r/clusters/c/instances/i")
    assert str(info.value) == (
        EXPECTED + '(instance URI = "projects/a:b:c/locations/r/clusters/c/instances/i")'
    )
    assert isinstance(info.value, FastproxyError)


# --- derived names --------------------------------------------------------------------------------


def test_derived_names() -> None:
    uri = InstanceURI.parse("projects/Google.com:My-Proj/locations/r/clusters/c/instances/I")
    assert uri.uri == "projects/Google.com:My-Proj/locations/r/clusters/c/instances/I"
    assert uri.cluster_parent == "projects/Google.com:My-Proj/locations/r/clusters/c"
    assert uri.short == "Google.com:My-Proj.r.c.I"
    assert uri.socket_dir_name == "google.com_my-proj.r.c.i"


def test_plain_project_names() -> None:
    uri = InstanceURI.parse(P)
    assert uri.cluster_parent == "projects/p/locations/r/clusters/c"
    assert uri.short == uri.socket_dir_name == "p.r.c.i"


def test_value_semantics() -> None:
    a, b = InstanceURI.parse(P), InstanceURI.parse(P)
    assert a == b and hash(a) == hash(b)
    assert {a: 1}[b] == 1
    assert a != InstanceURI.parse(P + "2")
    with pytest.raises(AttributeError):
        a.name = "x"  # type: ignore[misc]


# --- split_query ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        (P, (P, {})),
        (P + "?port=5000", (P, {"port": "5000"})),
        (P + "?port=5000&auto-iam-authn", (P, {"port": "5000", "auto-iam-authn": ""})),
        (P + "?auto-iam-authn=", (P, {"auto-iam-authn": ""})),
        (P + "?unix-socket-path=/tmp/a=b", (P, {"unix-socket-path": "/tmp/a=b"})),
        (
            P + "?address=127.0.0.1&port=1&psc=true",
            (P, {"address": "127.0.0.1", "port": "1", "psc": "true"}),
        ),
        (P + "?path=%2Ftmp", (P, {"path": "%2Ftmp"})),  # taken literally
        ("not-a-uri?k=v", ("not-a-uri", {"k": "v"})),  # the URI part is not validated here
    ],
)  # fmt: skip
def test_split_query(arg: str, expected: tuple[str, dict[str, str]]) -> None:
    assert split_query(arg) == expected


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        (P + "?", "empty option list"),
        (P + "?port=1&port=2", "'port' given more than once"),
        (P + "?psc&psc", "'psc' given more than once"),
        (P + "?port=1&&psc", "stray '&'"),
        (P + "?port=1&", "stray '&'"),
        (P + "?&port=1", "stray '&'"),
        (P + "?=5000", "malformed option"),
        (P + "?po rt=1", "malformed option"),
        (P + "?port=1?psc", "more than one '?'"),
    ],
)
def test_split_query_rejects(arg: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        split_query(arg)


def test_split_then_parse() -> None:
    raw, options = split_query("projects/google.com:p/locations/r/clusters/c/instances/i?port=7")
    assert InstanceURI.parse(raw).socket_dir_name == "google.com_p.r.c.i"
    assert options == {"port": "7"}


# --- properties -----------------------------------------------------------------------------------

segment = st.text(
    alphabet=st.characters(blacklist_characters=":/?", blacklist_categories=("Cc", "Zs", "Cs")),
    min_size=1,
    max_size=20,
).filter(lambda s: not any(c.isspace() for c in s))


@given(
    project=st.one_of(segment, st.builds(lambda d, p: f"{d}:{p}", segment, segment)),
    region=segment,
    cluster=segment,
    name=segment,
)
def test_roundtrip(project: str, region: str, cluster: str, name: str) -> None:
    text = f"projects/{project}/locations/{region}/clusters/{cluster}/instances/{name}"
    uri = InstanceURI.parse(text)
    assert (uri.project, uri.region, uri.cluster, uri.name) == (project, region, cluster, name)
    assert uri.uri == text
    assert InstanceURI.parse(uri.uri) == uri
    assert "/" not in uri.socket_dir_name and ":" not in uri.socket_dir_name
    assert split_query(text + "?k=v") == (text, {"k": "v"})


# Text built from the URI's own vocabulary hits the interesting near-misses far more often
# than uniform random text does.
vocabulary = st.lists(
    st.sampled_from(
        ["projects/", "/locations/", "/clusters/", "/instances/", "p", "r", ":", "/", "?", "&",
         "=", "k", " ", "\n", "\x00", "é", "google.com", ""]
    ),
    max_size=14,
).map("".join)  # fmt: skip


@given(st.one_of(st.text(max_size=80), vocabulary))
def test_fuzz_only_config_error(text: str) -> None:
    try:
        raw, _ = split_query(text)
    except ConfigError:
        raw = text
    try:
        uri = InstanceURI.parse(raw)
    except ConfigError as exc:
        assert str(exc).startswith(EXPECTED)
        return
    # Whatever was accepted also matches the connectors' own (looser) pattern.
    assert re.fullmatch(
        r"projects/([^:]+(:[^:]+)?)/locations/([^:]+)/clusters/([^:]+)/instances/([^:]+)", raw
    )
    assert uri.uri == raw
