"""Bad input: every parser of untrusted or user-written text raises only its documented error.

One property per parser, each run with the examples of the loaded Hypothesis profile
(``tests/conftest.py``): ``ci`` (the default, a few hundred examples) or ``fuzz``
(``HYPOTHESIS_PROFILE=fuzz``: 100,000 examples each, the dedicated long run).

* the metadata exchange decoder (bytes from the instance): ``ProtocolError``; a decoded answer
  other than OK: ``ExchangeRefused``; the outcome does not depend on how the bytes are split;
* instance URIs with their ``?query`` (command line, environment, config file): ``ConfigError``;
* Go durations (flags): ``ConfigError``;
* config files (``--config-file``: TOML, YAML, JSON, anything else): ``ConfigError``;
* static connection info (``--static-connection-info``): ``ConfigError``, for garbage and for a
  valid document with one part broken (wrong key types, truncated PEM, unknown algorithms...).

Strategies mix uniform noise with the parsers' own vocabulary, which reaches the interesting
near-misses far more often than random text does.
"""

from __future__ import annotations

import atexit
import base64
import functools
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from fastproxy.__main__ import _QUERY_KEYS, build_parser, parse_instance_arg
from fastproxy.config import (
    file_defaults,
    instances_from_file,
    layered_options,
    load_config_file,
    parse_layered,
)
from fastproxy.duration import parse_duration
from fastproxy.emulator.mdxcodec import ResponseCode, encode_response
from fastproxy.emulator.pki import PKI
from fastproxy.errors import ConfigError, ExchangeRefused, ProtocolError
from fastproxy.instance_uri import InstanceURI, split_query
from fastproxy.keys import generate_key, public_key_pem
from fastproxy.mdx import MAX_RESPONSE_SIZE, ResponseDecoder, check_response
from fastproxy.source import load_static_file, static_dial_info

DEMO_URI = (
    "projects/demo-project/locations/us-central1/clusters/demo-cluster/instances/demo-primary"
)

# 100,000 examples of the slowest property take a while: the per-test timeout follows the profile.
pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(max(300, settings().max_examples // 10))]

# Function-scoped fixtures are not used with @given; files go to one private directory.
_TMP = Path(tempfile.mkdtemp(prefix="fastproxy-fuzz-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return out


# --- the metadata exchange decoder ----------------------------------------------------------

_varint = st.integers(0, 2**64 - 1).map(
    lambda n: (
        bytes(
            [((n >> (7 * i)) & 0x7F) | (0x80 if n >> (7 * (i + 1)) else 0) for i in range(10)]
        ).rstrip(b"\x80")
        or b"\x00"
    )
)
_protobuf_piece = st.one_of(
    st.binary(max_size=12),
    st.tuples(st.integers(0, 255), _varint).map(lambda t: bytes([t[0]]) + t[1]),
    st.tuples(st.sampled_from([b"\x08", b"\x12", b"\x10", b"\x1a", b"\x0d", b"\x09"]), _varint).map(
        lambda t: t[0] + t[1]
    ),
    st.text(max_size=20).map(lambda s: b"\x12" + bytes([len(s.encode()) & 0x7F]) + s.encode()),
)
_body = st.lists(_protobuf_piece, max_size=8).map(b"".join)
_frames = st.one_of(
    st.binary(max_size=300),
    _body.map(lambda b: len(b).to_bytes(4, "big") + b),
    st.tuples(st.integers(0, 2**32 - 1), _body).map(lambda t: t[0].to_bytes(4, "big") + t[1]),
    st.tuples(st.sampled_from(list(ResponseCode)), st.text(max_size=40)).map(
        lambda t: encode_response(t[0], t[1])
    ),
)


def _decode(data: bytes, cuts: list[int], cap: int) -> tuple[str, Any]:
    """("ok", (response, unused)) or ("error", message); asserts the documented contract."""
    decoder = ResponseDecoder(max_size=cap)
    pieces = chunks(data, cuts)
    try:
        while pieces:
            if decoder.feed(pieces.pop(0)) is not None:
                break
    except ProtocolError as exc:
        assert not decoder.done
        assert str(exc) and "\n" not in str(exc)
        with pytest.raises(RuntimeError):
            decoder.feed(b"x")  # a rejected decoder refuses more input
        return "error", str(exc)
    if not decoder.done:
        return "incomplete", None
    resp = decoder.response
    assert resp is not None and isinstance(resp.error, str)
    if resp.response_code != ResponseCode.OK:
        with pytest.raises(ExchangeRefused):
            check_response(resp)
    else:
        check_response(resp)
    # What followed the frame in the completing piece, then the pieces not fed: the proxy
    # forwards the first and splices the rest.
    return "ok", (resp, decoder.unused + b"".join(pieces))


@given(
    data=st.one_of(_frames, st.tuples(_frames, st.binary(max_size=40)).map(b"".join)),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    cap=st.sampled_from([MAX_RESPONSE_SIZE, 0, 1, 8, 100]),
)
def test_fuzz_exchange_decoder(data: bytes, cuts: list[int], cap: int) -> None:
    chunked = _decode(data, cuts, cap)
    whole = _decode(data, [], cap)
    assert chunked == whole, "the outcome depends on how the bytes were split"
    if chunked[0] == "ok":
        size = int.from_bytes(data[:4], "big")
        assert chunked[1][1] == data[4 + size :]  # what follows the frame is kept, in full


# --- instance URIs and their query --------------------------------------------------------

_uri_words = st.sampled_from(
    ["projects/", "/locations/", "/clusters/", "/instances/", "p", "r", "c", "i", ":",
     "google.com:", "/", "?", "&", "=", " ", "\n", "\x00", "é", "%", "..", ""]
)  # fmt: skip
_uri_text = st.one_of(st.text(max_size=80), st.lists(_uri_words, max_size=14).map("".join))
_query_key = st.one_of(st.sampled_from([*_QUERY_KEYS, "bogus", "PORT", ""]), st.text(max_size=8))
_query_value = st.one_of(
    st.sampled_from(
        ["", "true", "T", "f", "False", "maybe", "0", "5432", "65535", "65536", "-1", "1e3",
         "127.0.0.1", "::1", "0.0.0.0", "localhost", "/tmp/x", "fe80::1%eth0", "٣"]
    ),
    st.text(max_size=12),
)  # fmt: skip
_query = st.lists(st.tuples(_query_key, _query_value, st.booleans()), max_size=5).map(
    lambda pairs: "&".join(k + (f"={v}" if eq else "") for k, v, eq in pairs)
)
_instance_args = st.one_of(
    _uri_text,
    st.tuples(
        st.sampled_from([DEMO_URI, "projects/a:b/locations/r/clusters/c/instances/i"]), _query
    ).map(lambda t: f"{t[0]}?{t[1]}"),
    st.tuples(_uri_text, _query).map(lambda t: f"{t[0]}?{t[1]}"),
)


@given(_instance_args)
def test_fuzz_instance_uri_and_query(arg: str) -> None:
    try:
        raw, query = split_query(arg)
    except ConfigError as exc:
        assert "\n" not in str(exc) or "\n" in arg
        raw, query = arg, {}
    try:
        uri = InstanceURI.parse(raw)
    except ConfigError:
        uri = None
    if uri is not None:
        assert uri.uri == raw and InstanceURI.parse(uri.uri) == uri
        assert "/" not in uri.socket_dir_name
    try:
        inst, parsed = parse_instance_arg(arg)
    except ConfigError:
        return
    assert uri is not None and inst.uri == uri
    assert set(parsed) <= set(_QUERY_KEYS)
    assert parsed == query
    if inst.port is not None:
        assert 0 <= inst.port <= 65535
    if inst.address is not None:
        import ipaddress

        ipaddress.ip_address(inst.address)


# --- durations ----------------------------------------------------------------------------

_duration_words = st.sampled_from(
    ["0", "1", "30", "1.5", ".5", "5.", "1e3", "-", "+", "ns", "us", "µs", "μs", "ms", "s", "m",
     "h", "d", " ", "٣", "inf", "nan", "9" * 400]
)  # fmt: skip


@given(st.one_of(st.text(max_size=40), st.lists(_duration_words, max_size=8).map("".join)))
def test_fuzz_duration(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ConfigError as exc:
        assert "invalid duration" in str(exc)
        return
    assert math.isfinite(seconds) and seconds >= 0.0
    assert text.strip() == "0" or re.fullmatch(
        r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+", text.strip(), re.ASCII
    )


# --- config files -----------------------------------------------------------------------

# One parser for the module: parse_layered restores its defaults after every parse.
_PARSER = build_parser()
_OPTIONS = layered_options(_PARSER)
_PARSER_KEYS = sorted(_OPTIONS)
_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["true", "1s", "0", "5432", DEMO_URI, "127.0.0.1", "yes", "off"]),
)
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
_key = st.one_of(
    st.sampled_from([*_PARSER_KEYS, "instance-uri", "instance-uri-0", "instance-uri-1",
                     "instance-uri-x", "config-file", "help", "version", "INSTANCE-URI", "Port"]),
    st.text(max_size=12),
)  # fmt: skip
_mapping = st.dictionaries(_key, _value, max_size=6)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return '""'


def _render(mapping: dict[str, Any], ext: str) -> bytes:
    if ext == ".json":
        return json.dumps(mapping).encode()
    if ext in (".yaml", ".yml"):
        return str(yaml.safe_dump(mapping, allow_unicode=True)).encode()
    return "\n".join(
        f"{json.dumps(k)} = {_toml_value(v)}" for k, v in mapping.items() if v is not None
    ).encode()


_exts = st.sampled_from([".toml", ".json", ".yaml", ".yml", ".TOML", ".ini", ""])
_config_files = st.one_of(
    st.tuples(_exts, st.binary(max_size=200)),
    st.tuples(_exts, st.text(max_size=200).map(str.encode)),
    st.tuples(_exts, _mapping).map(lambda t: (t[0], _render(t[1], t[0].lower()))),
)


@given(_config_files)
def test_fuzz_config_file(case: tuple[str, bytes]) -> None:
    ext, content = case
    path = _TMP / f"config{ext}"
    path.write_bytes(content)
    try:
        data = load_config_file(path)
        options = _OPTIONS
        defaults = file_defaults(data, options, path)
        instances = instances_from_file(data, path)
    except ConfigError as exc:
        assert str(exc)
        return
    dests = {a.dest for a in options.values()}
    assert set(defaults) <= dests
    assert all(isinstance(i, str) and i for i in instances)
    # The whole layered parse accepts what the loader accepted, or says why in one ConfigError.
    try:
        args, _ = parse_layered(_PARSER, ["--config-file", str(path)], {})
    except ConfigError:
        return
    assert args.config_file == str(path)


# --- static connection info ---------------------------------------------------------------


def _pem(der: bytes, label: str) -> str:
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN {label}-----\n{body}-----END {label}-----\n"


def _pkcs8(key: Any, password: bytes | None = None) -> str:
    enc = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
    )
    return pem.decode()


@functools.cache
def _material() -> dict[str, Any]:
    """A valid static document for DEMO_URI (signed by an in-process emulator PKI), and broken
    parts to swap into it. Built once: key generation is slow."""
    from fastproxy.emulator.state import Instance, InstanceName

    pki = PKI()
    key = generate_key()
    cert = pki.sign_client_certificate(
        InstanceName.parse(DEMO_URI).cluster_parent, public_key_pem(key), 3600, True, "f@x.com"
    )
    other = PKI()
    other_cert = other.sign_client_certificate(
        InstanceName.parse(DEMO_URI).cluster_parent, public_key_pem(key), 3600, True, "f@x.com"
    )
    del Instance
    rsa_other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    unknown_oid = bytes.fromhex("300d020100300506032a03040401" + "00")
    keys = [
        _pkcs8(key),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ).decode(),
        _pkcs8(rsa_other),
        _pkcs8(ec.generate_private_key(ec.SECP256R1())),
        _pkcs8(ed25519.Ed25519PrivateKey.generate()),
        _pkcs8(dsa.generate_private_key(1024)),
        _pkcs8(key, b"secret"),
        public_key_pem(key),
        cert.chain_pems[0],
        _pem(unknown_oid, "PRIVATE KEY"),
        _pem(os.urandom(64), "PRIVATE KEY"),
        _pem(os.urandom(64), "RSA PRIVATE KEY"),
        _pkcs8(key)[:200],
        "",
    ]
    doc = {
        "publicKey": public_key_pem(key),
        "privateKey": keys[0],
        DEMO_URI: {
            "ipAddress": "10.0.0.2",
            "publicIpAddress": "34.1.2.3",
            "pscInstanceConfig": {"pscDnsName": "x.y.alloydb.goog."},
            "pemCertificateChain": cert.chain_pems,
            "caCert": cert.ca_cert_pem,
        },
    }
    certs = [
        *cert.chain_pems,
        other_cert.chain_pems[0],
        other_cert.ca_cert_pem,
        cert.chain_pems[0][:100],
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "é",
        "",
    ]
    return {"doc": doc, "keys": keys, "certs": certs}


_json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=5,
)
_ENTRY_FIELDS = ["ipAddress", "publicIpAddress", "pscInstanceConfig", "pemCertificateChain",
                 "caCert"]  # fmt: skip


@st.composite
def _static_documents(draw: st.DrawFn) -> Any:
    m = _material()
    doc = json.loads(json.dumps(m["doc"]))
    entry = doc[DEMO_URI]
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["key", "chain", "ca", "field", "drop", "top", "whole"]))
        if what == "key":
            doc["privateKey"] = draw(st.sampled_from(m["keys"]))
        elif what == "chain":
            entry["pemCertificateChain"] = draw(
                st.one_of(
                    st.lists(st.sampled_from(m["certs"]), max_size=4),
                    st.permutations(m["doc"][DEMO_URI]["pemCertificateChain"]).map(list),
                    _json_value,
                )
            )
        elif what == "ca":
            entry["caCert"] = draw(st.one_of(st.sampled_from(m["certs"]), _json_value))
        elif what == "field":
            entry[draw(st.sampled_from(_ENTRY_FIELDS))] = draw(
                st.one_of(_json_value, st.sampled_from(["", "::1", "host.", ".", "10.0.0.2"]))
            )
        elif what == "drop":
            entry.pop(draw(st.sampled_from(_ENTRY_FIELDS)), None)
        elif what == "top":
            doc[draw(st.sampled_from(["privateKey", "publicKey", DEMO_URI]))] = draw(_json_value)
        else:
            return draw(_json_value)
    return doc


@given(
    doc=st.one_of(_static_documents(), st.binary(max_size=100)),
    public_ip=st.booleans(),
    psc=st.booleans(),
    auto_iam=st.booleans(),
    mdx=st.booleans(),
    token=st.sampled_from(["", "tok"]),
)
def test_fuzz_static_connection_info(
    doc: Any, public_ip: bool, psc: bool, auto_iam: bool, mdx: bool, token: str
) -> None:
    path = _TMP / "static.json"
    path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    try:
        data = load_static_file(path)
        info = static_dial_info(
            data,
            InstanceURI.parse(DEMO_URI),
            public_ip=public_ip,
            psc=psc,
            auto_iam_authn=auto_iam,
            exchange_token=token,
            metadata_exchange=mdx,
        )
    except ConfigError as exc:
        assert str(exc)
        return
    assert isinstance(info.address, str) and info.address and not info.address.endswith(".")
    assert math.isfinite(info.expires_at)
    assert token or not mdx


def test_static_private_key_of_an_unknown_type_is_a_config_error() -> None:
    """Found by test_fuzz_static_connection_info: a PKCS#8 key with an algorithm identifier
    cryptography does not know raised UnsupportedAlgorithm (a traceback from the CLI) instead of
    ConfigError."""
    doc = json.loads(json.dumps(_material()["doc"]))
    doc["privateKey"] = _pem(bytes.fromhex("300d020100300506032a0304040100"), "PRIVATE KEY")
    with pytest.raises(ConfigError, match="Unknown key type"):
        static_dial_info(doc, InstanceURI.parse(DEMO_URI), exchange_token="t")


@pytest.mark.parametrize("field", ["ipAddress", "publicIpAddress", "pscInstanceConfig"])
def test_static_address_of_only_dots_is_no_address(field: str) -> None:
    """Found by test_fuzz_static_connection_info: ``"."`` passed the "has an address" check and
    became ``""`` once its trailing dot was stripped, so the proxy would have dialled an empty
    host name instead of refusing the file."""
    doc = json.loads(json.dumps(_material()["doc"]))
    entry = doc[DEMO_URI]
    entry[field] = {"pscDnsName": ".."} if field == "pscInstanceConfig" else "."
    with pytest.raises(ConfigError, match="does not have IP of type"):
        static_dial_info(
            doc,
            InstanceURI.parse(DEMO_URI),
            public_ip=field == "publicIpAddress",
            psc=field == "pscInstanceConfig",
            exchange_token="t",
        )
