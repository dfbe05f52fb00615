"""The client's metadata-exchange codec: exact bytes (protocol.md §4.5), every chunking, errors.

The responses fed to the decoder are built by a tiny encoder written here, independently of
``fastproxy.mdx``, so a shared misunderstanding cannot make both sides agree on wrong bytes.
Hypothesis example counts come from the profile loaded in tests/conftest.py (``ci`` by default,
``HYPOTHESIS_PROFILE=fuzz`` for the long run).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastproxy.errors import ExchangeRefused, FastproxyError, ProtocolError
from fastproxy.mdx import (
    MAX_RESPONSE_SIZE,
    AuthType,
    MetadataExchangeResponse,
    ResponseCode,
    ResponseDecoder,
    check_response,
    encode_request,
)

GO_UA = "alloydb-go-connector/1.18.4"
TOKEN = "ya29.token"

# protocol.md §4.5, byte for byte.
REQUEST_AUTO_IAM = bytes.fromhex(
    "0000002b"
    "0a1b" + "616c6c6f7964622d676f2d636f6e6e" + "6563746f722f312e31382e34"
    "1002"
    "1a0a" + "796132392e746f6b656e"
)
RESPONSE_OK = bytes.fromhex("00000002 0801")
RESPONSE_DENIED = bytes.fromhex("0000000a 0802 1206 64656e696564")


# --- an independent test-side protobuf encoder ----------------------------------------------------


def varint(n: int) -> bytes:
    """Base-128 varint; negative numbers as their 64-bit two's complement (10 bytes)."""
    n &= (1 << 64) - 1
    out = []
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def varint_field(field: int, value: int) -> bytes:
    return key(field, 0) + varint(value)


def len_field(field: int, payload: bytes) -> bytes:
    return key(field, 2) + varint(len(payload)) + payload


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def response(code: int = 0, error: str = "") -> bytes:
    body = b""
    if code:
        body += varint_field(1, code)
    if error:
        body += len_field(2, error.encode())
    return frame(body)


def chunks(data: bytes, cuts: Sequence[int]) -> Iterator[bytes]:
    """``data`` cut at the given positions (any order, duplicates allowed: empty chunks)."""
    last = 0
    for cut in sorted(cuts):
        yield data[last:cut]
        last = cut
    yield data[last:]


def decode_split(data: bytes, cuts: Sequence[int], frame_len: int) -> tuple[object, bytes]:
    """Feed ``data`` in pieces; return the response and everything past the frame.

    Pieces after the one that completes the frame are not fed to the decoder (the proxy stops
    feeding at that point); they are appended to ``.unused`` to rebuild what the proxy forwards.
    """
    decoder = ResponseDecoder()
    pieces = list(chunks(data, cuts))
    fed = 0
    for i, piece in enumerate(pieces):
        fed += len(piece)
        resp = decoder.feed(memoryview(piece))
        if resp is None:
            assert fed < frame_len
            assert decoder.unused == b"" and not decoder.done
            continue
        assert fed >= frame_len
        assert decoder.done and decoder.response is resp
        return resp, decoder.unused + b"".join(pieces[i + 1 :])
    raise AssertionError("decoder never completed")


# --- request: exact bytes -------------------------------------------------------------------------


def test_request_auto_iam_exact_bytes() -> None:
    assert encode_request(GO_UA, AuthType.AUTO_IAM, TOKEN) == REQUEST_AUTO_IAM
    assert len(REQUEST_AUTO_IAM) == 4 + 43


def test_request_db_native_differs_only_in_auth_type() -> None:
    expected = REQUEST_AUTO_IAM.replace(b"\x10\x02", b"\x10\x01")
    assert encode_request(GO_UA, AuthType.DB_NATIVE, TOKEN) == expected


@pytest.mark.parametrize(
    ("size", "length_varint"),
    [(127, b"\x7f"), (128, b"\x80\x01"), (205, b"\xcd\x01"), (1000, b"\xe8\x07")],
)
def test_request_multibyte_token_length(size: int, length_varint: bytes) -> None:
    token = "t" * size
    req = encode_request(GO_UA, AuthType.AUTO_IAM, token)
    tail = b"\x1a" + length_varint + token.encode()
    assert req.endswith(tail)
    body = req[4:]
    assert int.from_bytes(req[:4], "big") == len(body) == 2 + 27 + 2 + len(tail)


def test_request_omits_empty_strings() -> None:
    assert encode_request("", AuthType.DB_NATIVE, "") == bytes.fromhex("00000002 1001")
    assert encode_request("ua", AuthType.AUTO_IAM, "") == bytes.fromhex("00000006 0a02 7561 1002")
    assert encode_request("", AuthType.AUTO_IAM, "t") == bytes.fromhex("00000005 1002 1a01 74")


def test_request_utf8_length_is_in_bytes() -> None:
    req = encode_request("é", AuthType.DB_NATIVE, "")
    assert req == bytes.fromhex("00000006 0a02 c3a9 1001")


def test_request_accepts_plain_ints_for_auth_type() -> None:
    assert encode_request(GO_UA, 2, TOKEN) == REQUEST_AUTO_IAM  # type: ignore[arg-type]


@pytest.mark.parametrize("auth_type", [AuthType.UNSPECIFIED, 0, 3, -1, None, "AUTO_IAM"])
def test_request_rejects_bad_auth_type(auth_type: object) -> None:
    with pytest.raises(ValueError, match="auth_type"):
        encode_request(GO_UA, auth_type, TOKEN)  # type: ignore[arg-type]


@pytest.mark.parametrize("token", ["Bearer ya29.token", "bearer ya29.token"])
def test_request_rejects_bearer_prefix(token: str) -> None:
    with pytest.raises(ValueError, match="Bearer"):
        encode_request(GO_UA, AuthType.AUTO_IAM, token)


def test_request_rejects_unencodable_text() -> None:
    with pytest.raises(ValueError, match="Unicode"):
        encode_request("\ud800", AuthType.AUTO_IAM, TOKEN)
    with pytest.raises(ValueError, match="Unicode"):
        encode_request(GO_UA, AuthType.AUTO_IAM, "\udfff")


@given(
    ua=st.text(max_size=300),
    auth=st.sampled_from([AuthType.DB_NATIVE, AuthType.AUTO_IAM]),
    token=st.text(max_size=3000).filter(lambda t: not t.lower().startswith("bearer ")),
)
def test_request_matches_independent_encoder(ua: str, auth: AuthType, token: str) -> None:
    body = b""
    if ua:
        body += len_field(1, ua.encode())
    body += varint_field(2, int(auth))
    if token:
        body += len_field(3, token.encode())
    assert encode_request(ua, auth, token) == frame(body)


# --- response: exact bytes and every split --------------------------------------------------------


def test_response_ok_exact_bytes() -> None:
    assert response(1) == RESPONSE_OK
    resp = ResponseDecoder().feed(RESPONSE_OK)
    assert resp == MetadataExchangeResponse(ResponseCode.OK, "")
    assert resp is not None and type(resp.response_code) is ResponseCode
    check_response(resp)


def test_response_error_exact_bytes() -> None:
    assert response(2, "denied") == RESPONSE_DENIED
    resp = ResponseDecoder().feed(RESPONSE_DENIED)
    assert resp == MetadataExchangeResponse(ResponseCode.ERROR, "denied")
    assert resp is not None
    with pytest.raises(ExchangeRefused) as info:
        check_response(resp)
    assert str(info.value) == "metadata exchange refused by server: denied"
    assert info.value.server_message == "denied"


TRAILER = b"R\x00\x00\x00\x08\x00\x00\x00\x00"  # a PostgreSQL AuthenticationOk, say


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (RESPONSE_OK, MetadataExchangeResponse(ResponseCode.OK)),
        (RESPONSE_DENIED, MetadataExchangeResponse(ResponseCode.ERROR, "denied")),
    ],
    ids=["ok", "denied"],
)
@pytest.mark.parametrize("trailer", [b"", TRAILER], ids=["alone", "with-trailer"])
def test_response_every_two_piece_split(
    wire: bytes, expected: MetadataExchangeResponse, trailer: bytes
) -> None:
    data = wire + trailer
    for cut in range(len(data) + 1):
        resp, rest = decode_split(data, [cut], len(wire))
        assert resp == expected, cut
        assert rest == trailer, cut


@pytest.mark.parametrize("wire", [RESPONSE_OK, RESPONSE_DENIED], ids=["ok", "denied"])
def test_response_byte_by_byte(wire: bytes) -> None:
    data = wire + TRAILER
    decoder = ResponseDecoder()
    for i in range(len(wire) - 1):
        assert decoder.feed(data[i : i + 1]) is None
        assert not decoder.done and decoder.response is None
    assert decoder.feed(data[len(wire) - 1 : len(wire)]) is not None
    assert decoder.unused == b""


def test_response_trailer_in_the_completing_piece_is_kept() -> None:
    decoder = ResponseDecoder()
    assert decoder.feed(RESPONSE_DENIED[:5]) is None
    assert decoder.feed(RESPONSE_DENIED[5:] + TRAILER) is not None
    assert decoder.unused == TRAILER
    assert type(decoder.unused) is bytes


def test_decoder_copies_what_it_keeps() -> None:
    """The proxy reuses its read buffer right after feed(); the decoder must not alias it."""
    scratch = bytearray(64)
    view = memoryview(scratch)
    decoder = ResponseDecoder()
    scratch[:3] = RESPONSE_DENIED[:3]
    assert decoder.feed(view[:3]) is None
    scratch[:] = b"\xee" * 64  # reuse the buffer
    rest = RESPONSE_DENIED[3:] + TRAILER
    scratch[: len(rest)] = rest
    assert decoder.feed(view[: len(rest)]) == MetadataExchangeResponse(ResponseCode.ERROR, "denied")
    unused = decoder.unused
    scratch[:] = b"\xee" * 64
    assert unused == TRAILER


def test_empty_feeds_are_harmless() -> None:
    decoder = ResponseDecoder()
    assert decoder.feed(b"") is None
    assert decoder.feed(RESPONSE_OK[:2]) is None
    assert decoder.feed(memoryview(b"")) is None
    assert decoder.feed(RESPONSE_OK[2:]) == MetadataExchangeResponse(ResponseCode.OK)


def test_zero_length_body_is_unspecified_and_refused() -> None:
    resp = ResponseDecoder().feed(b"\x00\x00\x00\x00")
    assert resp == MetadataExchangeResponse(ResponseCode.UNSPECIFIED, "")
    assert resp is not None
    with pytest.raises(ExchangeRefused, match="no error message; response code UNSPECIFIED"):
        check_response(resp)


def test_unknown_response_code_is_kept_and_refused() -> None:
    resp = ResponseDecoder().feed(response(7, "weird"))
    assert resp == MetadataExchangeResponse(7, "weird")
    assert resp is not None and type(resp.response_code) is int
    with pytest.raises(ExchangeRefused, match="weird"):
        check_response(resp)
    resp = ResponseDecoder().feed(response(9))
    assert resp is not None
    with pytest.raises(ExchangeRefused, match="response code 9"):
        check_response(resp)


def test_negative_response_code_is_int32() -> None:
    resp = ResponseDecoder().feed(response(-1))  # ten-byte varint, sign-extended
    assert resp == MetadataExchangeResponse(-1, "")


def test_last_value_wins_for_repeated_scalars() -> None:
    body = varint_field(1, 2) + len_field(2, b"a") + varint_field(1, 1) + len_field(2, b"b")
    assert ResponseDecoder().feed(frame(body)) == MetadataExchangeResponse(ResponseCode.OK, "b")


def test_unknown_fields_of_every_skippable_wire_type_are_skipped() -> None:
    body = (
        varint_field(9, 300)
        + key(10, 1) + b"\x01" * 8
        + len_field(11, b"\xff\xfe not utf-8 is fine here")
        + key(12, 5) + b"\x02" * 4
        + varint_field(1, 1)
        + len_field(536_870_911, b"max field number")
    )  # fmt: skip
    assert ResponseDecoder().feed(frame(body)) == MetadataExchangeResponse(ResponseCode.OK)


def test_known_field_with_other_wire_type_is_skipped() -> None:
    body = len_field(1, b"\x02") + key(2, 0) + b"\x05" + varint_field(1, 1)
    assert ResponseDecoder().feed(frame(body)) == MetadataExchangeResponse(ResponseCode.OK)


def test_non_minimal_varints_are_accepted() -> None:
    body = b"\x88\x00" + b"\x81\x80\x00"  # key 8 and value 1, both padded
    assert ResponseDecoder().feed(frame(body)) == MetadataExchangeResponse(ResponseCode.OK)


def test_error_text_unicode() -> None:
    text = "accès refusé ✋ 🚫"
    assert ResponseDecoder().feed(response(2, text)) == MetadataExchangeResponse(
        ResponseCode.ERROR, text
    )


# --- size cap -------------------------------------------------------------------------------------


def test_size_cap_default_is_16_kib() -> None:
    assert MAX_RESPONSE_SIZE == 16 * 1024
    big = response(2, "x" * (MAX_RESPONSE_SIZE - 5))  # 08 02 12 + 2-byte length
    assert len(big) - 4 == MAX_RESPONSE_SIZE
    resp = ResponseDecoder().feed(big)
    assert resp is not None and len(resp.error) == MAX_RESPONSE_SIZE - 5
    with pytest.raises(ProtocolError, match="too large"):
        ResponseDecoder().feed(response(2, "x" * (MAX_RESPONSE_SIZE - 4)))


def test_size_cap_rejects_as_soon_as_the_prefix_is_complete() -> None:
    decoder = ResponseDecoder()
    prefix = (MAX_RESPONSE_SIZE + 1).to_bytes(4, "big")
    assert decoder.feed(prefix[:3]) is None
    with pytest.raises(ProtocolError, match="too large"):
        decoder.feed(prefix[3:])  # no body byte needed to decide


def test_size_cap_in_the_fast_path_and_custom_cap() -> None:
    with pytest.raises(ProtocolError, match=r"4294967295 bytes, the limit is 16384"):
        ResponseDecoder().feed(b"\xff\xff\xff\xff")
    decoder = ResponseDecoder(max_size=2)
    assert decoder.feed(RESPONSE_OK) is not None
    with pytest.raises(ProtocolError, match="limit is 2"):
        ResponseDecoder(max_size=2).feed(RESPONSE_DENIED)
    assert ResponseDecoder(max_size=0).feed(b"\x00\x00\x00\x00") is not None
    with pytest.raises(ValueError):
        ResponseDecoder(max_size=-1)


# --- protocol errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"\x08", "truncated varint", id="value-missing"),
        pytest.param(b"\x08\x80", "truncated varint", id="value-truncated"),
        pytest.param(b"\x88", "truncated varint", id="key-truncated"),
        pytest.param(b"\x08" + b"\x80" * 10 + b"\x01", "longer than 10 bytes", id="overlong-value"),
        pytest.param(b"\x80" * 11, "longer than 10 bytes", id="overlong-key"),
        pytest.param(b"\x0b", "wire type 3", id="start-group"),
        pytest.param(b"\x0c", "wire type 4", id="end-group"),
        pytest.param(b"\x0e", "wire type 6", id="wire-type-6"),
        pytest.param(b"\x0f", "wire type 7", id="wire-type-7"),
        pytest.param(b"\x02\x00", "invalid field number 0", id="field-zero"),
        pytest.param(varint(1 << 32 | 0), "invalid field number", id="field-too-large"),
        pytest.param(b"\x12\x07denied", "runs past the end", id="string-beyond-end"),
        pytest.param(b"\x12", "truncated varint", id="string-length-missing"),
        pytest.param(b"\x5a\xff\xff\xff\xff\x0f", "runs past the end", id="huge-unknown-len"),
        pytest.param(b"\x49" + b"\x00" * 7, "needs 8 bytes", id="fixed64-beyond-end"),
        pytest.param(b"\x4d" + b"\x00" * 3, "needs 4 bytes", id="fixed32-beyond-end"),
        pytest.param(b"\x08\x02\x12\x02\xc3\x28", "not valid UTF-8", id="bad-utf8"),
        pytest.param(b"\x12\x03\xed\xa0\x80", "not valid UTF-8", id="utf8-surrogate"),
    ],
)
def test_protocol_errors(body: bytes, message: str) -> None:
    data = frame(body)
    for cut in range(len(data) + 1):  # the same error whatever the chunking
        decoder = ResponseDecoder()
        with pytest.raises(ProtocolError, match=message) as info:
            for piece in chunks(data, [cut]):
                decoder.feed(piece)
        assert str(info.value).startswith("metadata exchange response")
        with pytest.raises(RuntimeError, match="rejected"):
            decoder.feed(b"")


def test_protocol_error_is_a_fastproxy_error() -> None:
    assert issubclass(ProtocolError, FastproxyError)
    assert issubclass(ExchangeRefused, FastproxyError)


def test_feeding_after_completion_is_an_error() -> None:
    decoder = ResponseDecoder()
    assert decoder.feed(RESPONSE_OK + b"x") is not None
    with pytest.raises(RuntimeError, match="decoded"):
        decoder.feed(b"more")
    assert decoder.unused == b"x"  # unchanged by the refused feed


# --- cross-check with the emulator's own codec (written separately on purpose) --------------------


def test_emulator_codec_agrees() -> None:
    codec = pytest.importorskip("fastproxy.emulator.mdxcodec")
    req = codec.decode_request(REQUEST_AUTO_IAM[4:])
    assert (req.user_agent, req.auth_type, req.oauth2_token) == (GO_UA, 2, TOKEN)
    wire = codec.encode_response(codec.ResponseCode.ERROR, "no ✋")
    assert ResponseDecoder().feed(wire) == MetadataExchangeResponse(ResponseCode.ERROR, "no ✋")


# --- properties -----------------------------------------------------------------------------------

int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
field_numbers = st.integers(min_value=3, max_value=2**29 - 1)
unknown_field = st.one_of(
    st.builds(varint_field, field_numbers, st.integers(min_value=0, max_value=2**64 - 1)),
    st.builds(len_field, field_numbers, st.binary(max_size=40)),
    st.builds(lambda f, b: key(f, 1) + b, field_numbers, st.binary(min_size=8, max_size=8)),
    st.builds(lambda f, b: key(f, 5) + b, field_numbers, st.binary(min_size=4, max_size=4)),
)
known_field = st.one_of(
    st.tuples(st.just("code"), int32),
    st.tuples(st.just("error"), st.text(max_size=60)),
)


@st.composite
def encoded_responses(draw: st.DrawFn) -> tuple[bytes, MetadataExchangeResponse]:
    """A response body with known fields (possibly repeated) and unknown fields, in any order,
    with the response the decoder must produce (proto3: missing = default, last one wins)."""
    items = draw(st.lists(st.one_of(known_field, unknown_field), max_size=8))
    code, error = 0, ""
    body = b""
    for item in items:
        if isinstance(item, bytes):
            body += item
        elif item[0] == "code":
            assert isinstance(item[1], int)
            code = item[1]
            body += varint_field(1, code)
        else:
            assert isinstance(item[1], str)
            error = item[1]
            body += len_field(2, error.encode())  # st.text() never draws surrogates
    known: ResponseCode | int = ResponseCode(code) if code in (0, 1, 2) else code
    return frame(body), MetadataExchangeResponse(known, error)


@given(
    case=encoded_responses(),
    trailer=st.binary(max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
)
def test_roundtrip_any_chunking(
    case: tuple[bytes, MetadataExchangeResponse], trailer: bytes, cuts: list[int]
) -> None:
    wire, expected = case
    data = wire + trailer
    cuts = [c % (len(data) + 1) for c in cuts]
    resp, rest = decode_split(data, cuts, len(wire))
    assert resp == expected
    assert rest == trailer


@given(
    data=st.one_of(
        st.binary(max_size=200),
        # a plausible prefix then garbage, to reach the body decoder often
        st.binary(max_size=120).map(lambda b: frame(b) + b[:3]),
        st.binary(max_size=120).map(lambda b: frame(b)[: len(b) // 2 + 4]),
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=5),
    cap=st.sampled_from([MAX_RESPONSE_SIZE, 16, 0]),
)
def test_fuzz_only_protocol_error(data: bytes, cuts: list[int], cap: int) -> None:
    decoder = ResponseDecoder(max_size=cap)
    cuts = [c % (len(data) + 1) for c in cuts]
    try:
        for piece in chunks(data, cuts):
            if decoder.feed(piece) is not None:
                break
    except ProtocolError:
        assert not decoder.done
        return
    if decoder.done:
        resp = decoder.response
        assert resp is not None and isinstance(resp.error, str)
        if resp.response_code != ResponseCode.OK:
            with pytest.raises(ExchangeRefused):
                check_response(resp)
