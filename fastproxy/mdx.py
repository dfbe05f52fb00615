"""Sans-IO metadata exchange (MDX), client side: encode the request, decode the response.

After the TLS handshake with an AlloyDB instance and before the first PostgreSQL byte, the client
sends one ``MetadataExchangeRequest`` and waits for one ``MetadataExchangeResponse``
(docs/protocol.md §4). Each message is framed as::

    uint32_be(len(body)) || body            # the length excludes its own 4 bytes

where ``body`` is a proto3 message. We hand-code the few bytes of protobuf involved instead of
depending on a protobuf runtime: the request has three fields (``user_agent`` = 1, string;
``auth_type`` = 2, enum; ``oauth2_token`` = 3, string) and the response two
(``response_code`` = 1, enum; ``error`` = 2, string). proto3 rules apply: default values (0, "")
are omitted on the wire, a missing field means its default, unknown fields are skipped.

Why the decoder is incremental: the response arrives on a non-blocking TLS stream, and a read
returns whatever plaintext happens to be available — half a length prefix, a prefix and half a
body, or the whole response *followed by the first bytes of the PostgreSQL stream*. So
``ResponseDecoder.feed`` accepts any chunking, answers ``None`` while it needs more bytes, and
keeps the bytes that follow the frame in ``.unused`` so the proxy can forward them to the client
instead of losing them. It never does I/O and never blocks: the connection object owns the socket,
``mdx`` only knows messages (docs/design.md).

Safety: the length prefix is checked against a size cap as soon as its 4 bytes are in, so a
hostile or broken server cannot make us buffer megabytes; every malformed input raises
``ProtocolError`` and nothing else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from fastproxy.errors import ExchangeRefused, ProtocolError

__all__ = [
    "MAX_RESPONSE_SIZE",
    "AuthType",
    "MetadataExchangeResponse",
    "ResponseCode",
    "ResponseDecoder",
    "check_response",
    "encode_request",
]

#: Default cap on a response body. The Go connector reads the response into a pooled 16 KiB buffer
#: (protocol.md §4.2), so no server that works with it can send more; real responses are a few
#: bytes plus an error text.
MAX_RESPONSE_SIZE: Final = 16 * 1024

_PREFIX_SIZE: Final = 4
_MAX_FRAME_BODY: Final = 0xFFFF_FFFF  # what a uint32 length prefix can describe
_MAX_VARINT_BYTES: Final = 10  # a 64-bit value needs at most ceil(64 / 7) = 10 bytes
_MAX_FIELD_NUMBER: Final = (1 << 29) - 1  # protobuf field numbers are 29-bit

# Wire types (https://protobuf.dev/programming-guides/encoding/).
_WT_VARINT: Final = 0
_WT_I64: Final = 1
_WT_LEN: Final = 2
_WT_I32: Final = 5

# Request tags, precomputed: (field_number << 3) | wire_type, each fits in one byte.
_TAG_USER_AGENT: Final = b"\x0a"  # field 1, LEN
_TAG_OAUTH2_TOKEN: Final = b"\x1a"  # field 3, LEN

# Response field numbers.
_F_RESPONSE_CODE: Final = 1
_F_ERROR: Final = 2


class AuthType(enum.IntEnum):
    """``MetadataExchangeRequest.AuthType``: how the server authenticates the database user."""

    UNSPECIFIED = 0  # the server treats it as DB_NATIVE, but clients must not send it (§10)
    DB_NATIVE = 1  # PostgreSQL's own authentication (password) after the exchange
    AUTO_IAM = 2  # the server authenticates the database user from oauth2_token


class ResponseCode(enum.IntEnum):
    """``MetadataExchangeResponse.ResponseCode``; anything but OK is a refusal."""

    UNSPECIFIED = 0
    OK = 1
    ERROR = 2


# The auth_type field is always present (we never send UNSPECIFIED), so its two possible encodings
# are constants: tag 0x10 (field 2, VARINT) then the one-byte value.
_AUTH_TYPE_FIELD: Final[dict[int, bytes]] = {
    AuthType.DB_NATIVE: b"\x10\x01",
    AuthType.AUTO_IAM: b"\x10\x02",
}


@dataclass(frozen=True, slots=True)
class MetadataExchangeResponse:
    """A decoded response.

    ``response_code`` is a ``ResponseCode`` when the value is known; proto3 enums are open, so an
    unknown value is kept as a plain ``int`` (and counts as a refusal in ``check_response``).
    """

    response_code: ResponseCode | int
    error: str = ""


def _varint(n: int) -> bytes:
    """Encode a non-negative integer as a protobuf base-128 varint (little-endian groups)."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_request(user_agent: str, auth_type: AuthType, oauth2_token: str) -> bytes:
    """Return the complete request frame: 4-byte big-endian length, then the protobuf body.

    Byte-exact with protocol.md §4.5: fields in number order, empty strings omitted (proto3),
    ``auth_type`` always present. ``oauth2_token`` is the raw access token, sent in both auth modes;
    a ``Bearer `` prefix is a caller bug (the server would reject the token), so it is refused here
    where the mistake is easy to find.

    Raises ``ValueError`` for an auth type other than DB_NATIVE/AUTO_IAM, a ``Bearer`` token, text
    that is not encodable as UTF-8 (lone surrogates), or a body too large for the length prefix.
    """
    try:
        auth_field = _AUTH_TYPE_FIELD[auth_type]
    except (KeyError, TypeError):
        raise ValueError(
            f"auth_type must be AuthType.DB_NATIVE or AuthType.AUTO_IAM, got {auth_type!r}"
        ) from None
    if oauth2_token[:7].lower() == "bearer ":
        raise ValueError("oauth2_token must be the raw access token, without a 'Bearer ' prefix")
    try:
        ua = user_agent.encode("utf-8")
        token = oauth2_token.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"user_agent and oauth2_token must be valid Unicode text: {exc}") from exc

    parts: list[bytes] = []
    if ua:
        parts += (_TAG_USER_AGENT, _varint(len(ua)), ua)
    parts.append(auth_field)
    if token:
        parts += (_TAG_OAUTH2_TOKEN, _varint(len(token)), token)
    size = sum(map(len, parts))
    if size > _MAX_FRAME_BODY:
        raise ValueError(f"metadata exchange request too large ({size} bytes)")
    parts.insert(0, size.to_bytes(_PREFIX_SIZE, "big"))
    return b"".join(parts)


def check_response(resp: MetadataExchangeResponse) -> None:
    """Raise ``ExchangeRefused`` unless the server answered OK.

    UNSPECIFIED (an absent response code) and unknown codes are failures too, as in both official
    connectors (protocol.md §4.3): only an explicit OK lets PostgreSQL bytes flow.
    """
    if resp.response_code == ResponseCode.OK:
        return
    detail = resp.error
    if not detail:
        try:
            name = ResponseCode(resp.response_code).name
        except ValueError:
            name = str(int(resp.response_code))
        detail = f"(no error message; response code {name})"
    raise ExchangeRefused(f"metadata exchange refused by server: {detail}", resp.error)


# --------------------------------------------------------------------------------------------
# Decoding


def _read_varint(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    """Read a varint at ``buf[pos:end]``; return ``(value, new_pos)``.

    Values are truncated to 64 bits like every protobuf runtime does; more than 10 bytes is
    malformed (no 64-bit value needs them) and is refused rather than read forever.
    """
    result = 0
    shift = 0
    for _ in range(_MAX_VARINT_BYTES):
        if pos >= end:
            raise ProtocolError(f"metadata exchange response: truncated varint ({what})")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & 0xFFFF_FFFF_FFFF_FFFF, pos
        shift += 7
    raise ProtocolError(
        f"metadata exchange response: varint longer than {_MAX_VARINT_BYTES} bytes ({what})"
    )


def _as_int32(value: int) -> int:
    """Interpret a decoded 64-bit varint as a proto ``enum`` (int32, two's complement)."""
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _decode_response_body(body: bytes) -> MetadataExchangeResponse:
    """Decode a ``MetadataExchangeResponse`` body (without the length prefix).

    A known field arriving with an unexpected wire type is skipped like an unknown field, which is
    what the protobuf runtimes do; scalar fields repeated on the wire keep the last value (proto3).
    """
    code = 0
    error = ""
    pos = 0
    end = len(body)
    while pos < end:
        key, pos = _read_varint(body, pos, end, "field key")
        field, wire_type = key >> 3, key & 7
        if field == 0 or field > _MAX_FIELD_NUMBER:
            raise ProtocolError(f"metadata exchange response: invalid field number {field}")
        if wire_type == _WT_VARINT:
            value, pos = _read_varint(body, pos, end, f"field {field}")
            if field == _F_RESPONSE_CODE:
                code = _as_int32(value)
        elif wire_type == _WT_LEN:
            length, pos = _read_varint(body, pos, end, f"length of field {field}")
            if length > end - pos:
                raise ProtocolError(
                    f"metadata exchange response: field {field} length {length} "
                    f"runs past the end of the message ({end - pos} bytes left)"
                )
            if field == _F_ERROR:
                try:
                    error = body[pos : pos + length].decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ProtocolError(
                        f"metadata exchange response: error text is not valid UTF-8: {exc}"
                    ) from None
            pos += length
        elif wire_type in (_WT_I64, _WT_I32):
            width = 8 if wire_type == _WT_I64 else 4
            if width > end - pos:
                raise ProtocolError(
                    f"metadata exchange response: field {field} needs {width} bytes "
                    f"past the end of the message ({end - pos} bytes left)"
                )
            pos += width
        else:
            # 3 and 4 are the deprecated group markers, 6 and 7 are undefined.
            raise ProtocolError(
                f"metadata exchange response: unsupported wire type {wire_type} (field {field})"
            )
    try:
        return MetadataExchangeResponse(ResponseCode(code), error)
    except ValueError:
        return MetadataExchangeResponse(code, error)


class _State(enum.Enum):
    RECEIVING = enum.auto()
    DONE = enum.auto()
    FAILED = enum.auto()


class ResponseDecoder:
    """Incremental decoder of one length-prefixed ``MetadataExchangeResponse``.

    Feed it every plaintext chunk read from the instance connection, in order::

        decoder = ResponseDecoder()
        while (resp := decoder.feed(read_some())) is None:
            pass
        check_response(resp)
        forward_to_client(decoder.unused)   # PostgreSQL bytes that came in the same read

    ``feed`` copies what it keeps, so the caller may reuse its read buffer (a pooled memoryview)
    right after the call. When a whole frame arrives in one chunk, which is the common case, no
    intermediate buffer is used at all.

    One decoder decodes one response: after it returns the response or raises ``ProtocolError``,
    feeding it again is a programming error (``RuntimeError``).
    """

    __slots__ = ("_body_size", "_buf", "_max_size", "_response", "_state", "_unused")

    def __init__(self, max_size: int = MAX_RESPONSE_SIZE) -> None:
        """``max_size`` caps the body length (excluding the 4-byte prefix)."""
        if max_size < 0:
            raise ValueError(f"max_size must be >= 0, got {max_size}")
        self._max_size = max_size
        self._buf = bytearray()
        self._body_size: int | None = None
        self._state = _State.RECEIVING
        self._response: MetadataExchangeResponse | None = None
        self._unused = b""

    @property
    def done(self) -> bool:
        """True once the response has been decoded."""
        return self._state is _State.DONE

    @property
    def response(self) -> MetadataExchangeResponse | None:
        """The decoded response, or None before it is complete."""
        return self._response

    @property
    def unused(self) -> bytes:
        """Bytes received after the end of the response frame (empty until it is complete).

        After an OK these are the first bytes of the PostgreSQL stream and must be forwarded.
        """
        return self._unused

    def feed(self, data: bytes | bytearray | memoryview) -> MetadataExchangeResponse | None:
        """Consume ``data``; return the response once its frame is complete, else None.

        Raises ``ProtocolError`` on a length prefix above the cap (as soon as the prefix is
        complete, without waiting for the body) or on a malformed body.
        """
        if self._state is not _State.RECEIVING:
            raise RuntimeError(
                "ResponseDecoder.feed() called after the response was "
                + ("decoded" if self._state is _State.DONE else "rejected")
            )
        try:
            buf = self._buf
            if not buf:
                # Fast path: nothing buffered, work on the caller's chunk directly.
                resp = self._try_frame(data)
                if resp is not None:
                    return resp
            buf += data
            return self._try_frame(buf)
        except ProtocolError:
            self._state = _State.FAILED
            self._buf = bytearray()
            raise

    def _try_frame(self, view: bytes | bytearray | memoryview) -> MetadataExchangeResponse | None:
        """Decode a frame from the start of ``view`` if it is complete; else None."""
        size = self._body_size
        if size is None:
            if len(view) < _PREFIX_SIZE:
                return None
            size = int.from_bytes(view[:_PREFIX_SIZE], "big")
            if size > self._max_size:
                raise ProtocolError(
                    f"metadata exchange response too large: length prefix says {size} bytes, "
                    f"the limit is {self._max_size}"
                )
            self._body_size = size
        end = _PREFIX_SIZE + size
        if len(view) < end:
            return None
        resp = _decode_response_body(bytes(view[_PREFIX_SIZE:end]))
        self._unused = bytes(view[end:])
        self._response = resp
        self._state = _State.DONE
        self._buf = bytearray()
        return resp
