"""The emulator's metadata-exchange codec against the exact bytes of protocol.md §4.5."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastproxy.emulator.mdxcodec import (
    MAX_REQUEST_SIZE,
    AuthType,
    MDXDecodeError,
    MetadataExchangeRequest,
    ResponseCode,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    encode_varint,
    request_length,
)

GO_UA = "alloydb-go-connector/1.18.4"
# protocol.md §4.5, byte for byte (prefix included).
AUTO_IAM_FRAME = bytes.fromhex(
    "0000002b"
    "0a1b"
    "616c6c6f7964622d676f2d636f6e6e"
    "6563746f722f312e31382e34"
    "1002"
    "1a0a"
    "796132392e746f6b656e"
)
DB_NATIVE_FRAME = AUTO_IAM_FRAME.replace(b"\x10\x02", b"\x10\x01")


def test_spec_request_auto_iam() -> None:
    assert request_length(AUTO_IAM_FRAME[:4]) == 43 == len(AUTO_IAM_FRAME) - 4
    req = decode_request(AUTO_IAM_FRAME[4:])
    assert req == MetadataExchangeRequest(GO_UA, AuthType.AUTO_IAM, "ya29.token")
    assert encode_request(GO_UA, AuthType.AUTO_IAM, "ya29.token") == AUTO_IAM_FRAME


def test_spec_request_db_native() -> None:
    req = decode_request(DB_NATIVE_FRAME[4:])
    assert req.auth_type == AuthType.DB_NATIVE
    assert req.oauth2_token == "ya29.token"
    assert encode_request(GO_UA, AuthType.DB_NATIVE, "ya29.token") == DB_NATIVE_FRAME


@pytest.mark.parametrize(("size", "varint"), [(205, "cd01"), (1000, "e807")])
def test_long_token_varints(size: int, varint: str) -> None:
    token = "t" * size
    body = encode_request(oauth2_token=token, framed=False)
    assert body[:3] == bytes.fromhex("1a" + varint)
    assert len(body) == 3 + size
    assert decode_request(body).oauth2_token == token


def test_spec_responses() -> None:
    assert encode_response(ResponseCode.OK) == bytes.fromhex("00000002 0801")
    assert encode_response(ResponseCode.ERROR, "denied") == bytes.fromhex(
        "0000000a 0802 1206 64656e696564"
    )
    assert decode_response(bytes.fromhex("0802120664656e696564")) == (2, "denied")


def test_empty_body_is_all_defaults() -> None:
    assert decode_request(b"") == MetadataExchangeRequest("", 0, "")


def test_unknown_fields_are_skipped() -> None:
    body = (
        bytes.fromhex("2005")  # field 4 varint
        + bytes.fromhex("290102030405060708")  # field 5 fixed64
        + bytes.fromhex("320378797a")  # field 6 len "xyz"
        + bytes.fromhex("3d01020304")  # field 7 fixed32
        + encode_request(oauth2_token="tok", framed=False)
    )
    assert decode_request(body).oauth2_token == "tok"


def test_last_value_wins_and_negative_auth_type() -> None:
    body = bytes.fromhex("1001") + bytes.fromhex("1002")
    assert decode_request(body).auth_type == 2
    negative = bytes.fromhex("10") + encode_varint(-1)
    assert len(negative) == 11
    assert decode_request(negative).auth_type == -1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (bytes.fromhex("0a05616263"), "declares 5 bytes"),  # truncated string
        (bytes.fromhex("10"), "truncated varint"),  # key without value
        (bytes.fromhex("1080"), "truncated varint"),  # value cut mid-varint
        (bytes.fromhex("0b"), "unsupported wire type 3"),  # start group
        (bytes.fromhex("0c"), "unsupported wire type 4"),  # end group
        (bytes.fromhex("0e"), "unsupported wire type 6"),
        (bytes.fromhex("10" + "ff" * 10 + "01"), "overlong varint"),
        (bytes.fromhex("10" + "ff" * 9 + "02"), "overlong varint"),
        (bytes.fromhex("10" + "80" * 10 + "00"), "overlong varint"),
        (bytes.fromhex("1a02c328"), "not valid UTF-8"),
        (bytes.fromhex("0a01ff"), "not valid UTF-8"),
        (bytes.fromhex("0801"), "must be a string"),  # user_agent as varint
        (bytes.fromhex("120101"), "must be a varint"),  # auth_type as bytes
        (bytes.fromhex("1d01020304"), "wire type 5"),  # token as fixed32
        (bytes.fromhex("290102"), "truncated fixed-size"),
        (bytes.fromhex("3d01"), "truncated fixed-size"),
        (bytes.fromhex("0001"), "field number 0"),
    ],
)
def test_strict_errors(body: bytes, message: str) -> None:
    with pytest.raises(MDXDecodeError, match=message):
        decode_request(body)


def test_size_cap() -> None:
    assert request_length((MAX_REQUEST_SIZE).to_bytes(4, "big")) == MAX_REQUEST_SIZE
    with pytest.raises(MDXDecodeError, match="exceeds"):
        request_length((MAX_REQUEST_SIZE + 1).to_bytes(4, "big"))
    with pytest.raises(MDXDecodeError, match="exceeds"):
        decode_request(b"\x00" * (MAX_REQUEST_SIZE + 1))
    with pytest.raises(MDXDecodeError, match="needs 4 bytes"):
        request_length(b"\x00\x00")


def test_repr_hides_token() -> None:
    assert "secret" not in repr(MetadataExchangeRequest("ua", 1, "secret-token"))


@given(
    ua=st.text(max_size=64),
    auth=st.integers(min_value=0, max_value=2),
    token=st.text(max_size=2000),
)
def test_round_trip(ua: str, auth: int, token: str) -> None:
    frame = encode_request(ua, auth, token)
    assert request_length(frame[:4]) == len(frame) - 4
    assert decode_request(frame[4:]) == MetadataExchangeRequest(ua, auth, token)


@given(st.binary(max_size=256))
def test_fuzz_decoder_only_raises_its_error(data: bytes) -> None:
    with contextlib.suppress(MDXDecodeError):
        decode_request(data)


@given(code=st.sampled_from(list(ResponseCode)), error=st.text(max_size=300))
def test_response_round_trip(code: ResponseCode, error: str) -> None:
    frame = encode_response(code, error)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert decode_response(frame[4:]) == (int(code), error)
