"""Cost of the metadata exchange codec per upstream connection (pytest-benchmark).

Run with ``pytest perf/`` or ``pytest perf/bench_mdx.py``. The exchange runs once per connection,
so these numbers bound the per-connection setup cost the codec adds (next to a TLS handshake
they should be noise). What each number is:

* ``encode_request_1k_token``: one request frame with the Go connector's user agent and a
  realistic ~1 KiB access token (tokens are a few hundred bytes to ~2 KiB).
* ``decode_ok_one_piece``: a fresh decoder fed the 6-byte OK response in one chunk (the common
  case: the server writes prefix and body in one TLS record), through a memoryview like the proxy's
  read buffer.
* ``decode_ok_two_pieces``: the same response split after the length prefix, so the decoder has to
  buffer (the slow path).
* ``decode_ok_with_trailer``: OK followed by 64 bytes of PostgreSQL data in the same read, which
  the decoder must keep in ``.unused``.
"""

from __future__ import annotations

from pytest_benchmark.fixture import BenchmarkFixture

from fastproxy.mdx import AuthType, ResponseCode, ResponseDecoder, encode_request

USER_AGENT = "alloydb-go-connector/1.18.4"
TOKEN = "ya29." + "a0AfB_byC" * 113  # 1022 characters, the shape of a real access token
OK = bytes.fromhex("00000002 0801")


def test_encode_request_1k_token(benchmark: BenchmarkFixture) -> None:
    frame = benchmark(encode_request, USER_AGENT, AuthType.AUTO_IAM, TOKEN)
    assert len(frame) == 4 + 2 + len(USER_AGENT) + 2 + 3 + len(TOKEN)


def test_decode_ok_one_piece(benchmark: BenchmarkFixture) -> None:
    view = memoryview(bytearray(OK))

    def decode() -> object:
        return ResponseDecoder().feed(view)

    resp = benchmark(decode)
    assert resp is not None and getattr(resp, "response_code", None) is ResponseCode.OK


def test_decode_ok_two_pieces(benchmark: BenchmarkFixture) -> None:
    view = memoryview(bytearray(OK))
    head, tail = view[:4], view[4:]

    def decode() -> object:
        decoder = ResponseDecoder()
        decoder.feed(head)
        return decoder.feed(tail)

    resp = benchmark(decode)
    assert resp is not None and getattr(resp, "response_code", None) is ResponseCode.OK


def test_decode_ok_with_trailer(benchmark: BenchmarkFixture) -> None:
    view = memoryview(bytearray(OK + b"P" * 64))

    def decode() -> bytes:
        decoder = ResponseDecoder()
        decoder.feed(view)
        return decoder.unused

    assert benchmark(decode) == b"P" * 64
