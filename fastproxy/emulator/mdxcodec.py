"""The emulator's own metadata-exchange codec (protocol.md §4.1, §4.2, §4.5).

Deliberately independent of the proxy's ``fastproxy.mdx``: the emulator is the other side of the
wire, and two implementations that agree because they follow the spec catch more bugs than one
shared implementation that agrees with itself. Nothing here imports from ``fastproxy`` outside
``fastproxy.emulator``.

Only the server's needs are covered: decode a ``MetadataExchangeRequest`` body strictly and encode
a framed ``MetadataExchangeResponse``. ``encode_request`` exists for tests and tools. The decoder
is strict where a lenient one would hide client bugs: truncated fields, unsupported wire types
(groups), overlong varints and invalid UTF-8 are errors; unknown fields of wire types 0, 1, 2 and 5
are skipped, as proto3 requires.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

# Go's client reads into a pooled 16 KiB buffer (§4.2); a larger request is not a real client.
MAX_REQUEST_SIZE = 16 * 1024
LENGTH_PREFIX_SIZE = 4
_PREFIX = struct.Struct(">I")
# A varint encodes at most 64 bits: 10 groups of 7 bits, the last carrying only 1 bit.
_MAX_VARINT_BYTES = 10

# Wire types (protobuf encoding spec).
WT_VARINT = 0
WT_I64 = 1
WT_LEN = 2
WT_I32 = 5

# MetadataExchangeRequest field numbers.
_F_USER_AGENT = 1
_F_AUTH_TYPE = 2
_F_OAUTH2_TOKEN = 3
# MetadataExchangeResponse field numbers.
_F_RESPONSE_CODE = 1
_F_ERROR = 2


class AuthType(enum.IntEnum):
    UNSPECIFIED = 0  # the server treats it as DB_NATIVE (proto comment)
    DB_NATIVE = 1
    AUTO_IAM = 2


class ResponseCode(enum.IntEnum):
    UNSPECIFIED = 0
    OK = 1
    ERROR = 2


class MDXDecodeError(ValueError):
    """A request the emulator refuses to interpret; the message says which byte went wrong."""


@dataclass(frozen=True)
class MetadataExchangeRequest:
    """A decoded request. ``auth_type`` stays an ``int``: proto3 enums are open, so an unknown
    value decodes fine and it is the server's policy (not the codec's) to refuse it."""

    user_agent: str = ""
    auth_type: int = 0
    oauth2_token: str = ""

    def __repr__(self) -> str:
        # Never let a token reach a log line through a repr.
        return (
            f"MetadataExchangeRequest(user_agent={self.user_agent!r}, "
            f"auth_type={self.auth_type}, oauth2_token=<{len(self.oauth2_token)} chars>)"
        )


# --- primitives --------------------------------------------------------------------------------
def encode_varint(n: int) -> bytes:
    """Little-endian base-128; negative numbers as their 64-bit two's complement (proto rule)."""
    if n < 0:
        n += 1 << 64
    if not 0 <= n < 1 << 64:
        raise ValueError(f"varint out of range: {n}")
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """Decode the varint at ``pos``; returns (value, next position)."""
    result = 0
    shift = 0
    start = pos
    end = len(buf)
    while True:
        if pos >= end:
            raise MDXDecodeError(f"truncated varint at offset {start}")
        b = buf[pos]
        pos += 1
        # The 10th byte may only carry bit 63 and must end the varint.
        if pos - start == _MAX_VARINT_BYTES and b > 0x01:
            raise MDXDecodeError(
                f"overlong varint at offset {start} (more than 10 bytes or over 64 bits)"
            )
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _field(number: int, wire_type: int) -> bytes:
    return encode_varint((number << 3) | wire_type)


def _string_field(number: int, value: str) -> bytes:
    data = value.encode("utf-8")
    return _field(number, WT_LEN) + encode_varint(len(data)) + data


def _decode_str(raw: memoryview, field_name: str, offset: int) -> str:
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise MDXDecodeError(
            f"field {field_name} at offset {offset} is not valid UTF-8 ({exc.reason})"
        ) from None


# --- request -----------------------------------------------------------------------------------
def decode_request(body: bytes | bytearray | memoryview) -> MetadataExchangeRequest:
    """Decode a ``MetadataExchangeRequest`` body (without its length prefix).

    Raises ``MDXDecodeError`` for anything a conforming encoder cannot have produced.
    """
    buf = memoryview(body).cast("B")
    if len(buf) > MAX_REQUEST_SIZE:
        raise MDXDecodeError(f"request of {len(buf)} bytes exceeds {MAX_REQUEST_SIZE}")
    user_agent = ""
    auth_type = 0
    token = ""
    pos = 0
    end = len(buf)
    while pos < end:
        key_at = pos
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 0x07
        if number == 0:
            raise MDXDecodeError(f"field number 0 at offset {key_at}")
        if wire_type == WT_VARINT:
            value, pos = _read_varint(buf, pos)
            if number == _F_AUTH_TYPE:
                # An int32 enum: negative values arrive sign-extended to 64 bits.
                auth_type = value - (1 << 64) if value >= 1 << 63 else value
            elif number in (_F_USER_AGENT, _F_OAUTH2_TOKEN):
                raise MDXDecodeError(f"field {number} at offset {key_at} must be a string")
        elif wire_type == WT_LEN:
            length, pos = _read_varint(buf, pos)
            if length > end - pos:
                raise MDXDecodeError(
                    f"field {number} at offset {key_at} declares {length} bytes, "
                    f"only {end - pos} left"
                )
            raw = buf[pos : pos + length]
            if number == _F_USER_AGENT:
                user_agent = _decode_str(raw, "user_agent", key_at)
            elif number == _F_OAUTH2_TOKEN:
                token = _decode_str(raw, "oauth2_token", key_at)
            elif number == _F_AUTH_TYPE:
                # Packed encoding is only legal for repeated fields; auth_type is singular.
                raise MDXDecodeError(f"field auth_type at offset {key_at} must be a varint")
            pos += length
        elif wire_type in (WT_I64, WT_I32):
            if number in (_F_USER_AGENT, _F_AUTH_TYPE, _F_OAUTH2_TOKEN):
                raise MDXDecodeError(
                    f"field {number} at offset {key_at} has wire type {wire_type}"
                )
            size = 8 if wire_type == WT_I64 else 4
            if size > end - pos:
                raise MDXDecodeError(f"truncated fixed-size field {number} at offset {key_at}")
            pos += size
        else:
            raise MDXDecodeError(
                f"unsupported wire type {wire_type} (field {number}) at offset {key_at}"
            )
    return MetadataExchangeRequest(user_agent=user_agent, auth_type=auth_type, oauth2_token=token)


def encode_request(
    user_agent: str = "", auth_type: int = 0, oauth2_token: str = "", *, framed: bool = True
) -> bytes:
    """Encode a request (fields in number order, proto3 defaults omitted); for tests and tools."""
    body = b""
    if user_agent:
        body += _string_field(_F_USER_AGENT, user_agent)
    if auth_type:
        body += _field(_F_AUTH_TYPE, WT_VARINT) + encode_varint(auth_type)
    if oauth2_token:
        body += _string_field(_F_OAUTH2_TOKEN, oauth2_token)
    return _PREFIX.pack(len(body)) + body if framed else body


def request_length(prefix: bytes | bytearray | memoryview) -> int:
    """The body length announced by a 4-byte prefix; refuses anything over the cap.

    Checked before reading the body so an absurd prefix cannot make the server buffer megabytes.
    """
    if len(prefix) < LENGTH_PREFIX_SIZE:
        raise MDXDecodeError(f"length prefix needs 4 bytes, got {len(prefix)}")
    (size,) = _PREFIX.unpack_from(prefix)
    if size > MAX_REQUEST_SIZE:
        raise MDXDecodeError(
            f"metadata exchange request of {size} bytes exceeds the {MAX_REQUEST_SIZE}-byte limit"
        )
    return int(size)


# --- response ----------------------------------------------------------------------------------
def encode_response(code: ResponseCode, error: str = "") -> bytes:
    """A framed ``MetadataExchangeResponse``: prefix and body as ONE bytes object.

    One object so the caller can hand it to a single TLS write: Go reads the reply with two
    single ``Read`` calls and may mis-read a reply split over two records (§4.2).
    """
    body = b""
    if code:
        body += _field(_F_RESPONSE_CODE, WT_VARINT) + encode_varint(int(code))
    if error:
        body += _string_field(_F_ERROR, error)
    return _PREFIX.pack(len(body)) + body


def decode_response(body: bytes | bytearray | memoryview) -> tuple[int, str]:
    """Decode a response body (without prefix) into (response_code, error); for tests."""
    buf = memoryview(body).cast("B")
    code = 0
    error = ""
    pos = 0
    while pos < len(buf):
        key_at = pos
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 0x07
        if wire_type == WT_VARINT:
            value, pos = _read_varint(buf, pos)
            if number == _F_RESPONSE_CODE:
                code = value
        elif wire_type == WT_LEN:
            length, pos = _read_varint(buf, pos)
            if length > len(buf) - pos:
                raise MDXDecodeError(f"truncated field {number} at offset {key_at}")
            if number == _F_ERROR:
                error = _decode_str(buf[pos : pos + length], "error", key_at)
            pos += length
        elif wire_type in (WT_I64, WT_I32):
            pos += 8 if wire_type == WT_I64 else 4
            if pos > len(buf):
                raise MDXDecodeError(f"truncated fixed-size field {number} at offset {key_at}")
        else:
            raise MDXDecodeError(f"unsupported wire type {wire_type} at offset {key_at}")
    return code, error
